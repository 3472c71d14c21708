"""artifacts/blocks.py: shards folded into blocks in id order whatever order they arrive in, blocks persisted and
merged; checked against numpy's one-pass statistics, across arrival orders, kills, and against a file a shard."""

import math
import random

import numpy as np
import pytest
import torch

from d3hr_ray.artifacts.blocks import MAX_BLOCKS, Blocks, BlockWriter, block_size, merge_blocks
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.stages.stats import ClassStats
from d3hr_ray.storage.fs import OutputDir

C, D = 30, 6


def _shards(n_shards=13, per=20, shuffled=True, seed=0):
    """{shard id: (latents (n, D) float32, labels (n,))}, shard ids with gaps (as a narrowed listing may have)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_shards):
        x = rng.normal(size=(per, D)).astype(np.float32) * rng.uniform(0.5, 3) + rng.normal()
        y = rng.integers(0, C, per) if shuffled else np.full(per, (i * C) // n_shards)
        out[3 * i + 1] = (x, y)
    return out


def _partial(x, y):
    return ClassStats(C, D).update(torch.from_numpy(x), torch.from_numpy(y)).to_partial()


def _feed(state: RunState, blocks: Blocks, shards: dict, order: list[int]) -> BlockWriter:
    writer = BlockWriter(blocks, D, state.write_block)
    for sid in order:
        x, y = shards[sid]
        read = {int(c): int((y == c).sum()) for c in np.unique(y)}
        writer.add(sid, _partial(x, y), read, [[f"bad-{sid}", -1, "why"]])
    return writer


def _merged(state: RunState, blocks: Blocks):
    stats, read, skipped = ClassStats(C, D), np.zeros(C, np.int64), []
    merge_blocks(state.iter_blocks(list(range(len(blocks)))), stats, read, skipped)
    return stats, read, skipped


def test_block_size_follows_its_two_bounds():
    # 1,252 shards of 1,024 (ImageNet-1K): at most MAX_BLOCKS blocks
    assert block_size(1252, 1_281_167, 1000) == math.ceil(1252 / MAX_BLOCKS)
    # the tiny shuffled run: 40 shards of 50 in 100 classes, a block averages 4 images a class
    assert block_size(40, 2000, 100) == 8
    # few shards of many images each: a shard a block, as before blocks
    assert block_size(8, 1797, 10) == 1
    assert block_size(3, 30, 1000) == 3 and block_size(0, 0, 5) == 1


def test_blocks_cut_sorted_ids_into_runs():
    b = Blocks((1, 4, 7, 10, 13), 2)
    assert len(b) == 3 and b.shards(0) == (1, 4) and b.shards(2) == (13,)
    assert [b.of(s) for s in (1, 4, 7, 10, 13)] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="sorted"):
        Blocks((4, 1), 2)


@pytest.mark.parametrize("size", [1, 3, 13])
def test_any_arrival_order_gives_the_same_blocks_bit_for_bit_and_numpys_statistics(tmp_path, size):
    shards = _shards()
    blocks = Blocks(tuple(sorted(shards)), size)
    orders = [sorted(shards), sorted(shards, reverse=True)] + [
        random.Random(s).sample(sorted(shards), 13) for s in (1, 2)
    ]
    files = []
    for i, order in enumerate(orders):
        state = RunState(OutputDir(str(tmp_path / str(i))))
        _feed(state, blocks, shards, order).close()
        assert state.finished_blocks() == set(range(len(blocks)))
        files.append({b: state.read_block(b) for b in range(len(blocks))})
    for f in files[1:]:  # the tensors bit for bit, and the counts and skips (safetensors orders its header freely)
        for b, (part, read, skipped) in f.items():
            ref = files[0][b]
            assert all(torch.equal(part[k], ref[0][k]) for k in part) and (read, skipped) == ref[1:], b

    stats, read, skipped = _merged(RunState(OutputDir(str(tmp_path / "0"))), blocks)
    x = np.concatenate([shards[s][0] for s in sorted(shards)]).astype(np.float64)
    y = np.concatenate([shards[s][1] for s in sorted(shards)])
    for c in range(C):
        rows = x[y == c]
        assert stats.n[c] == len(rows) == read[c]
        if len(rows) >= 2:
            np.testing.assert_allclose(stats.mu[c].numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose((stats.m2[c] / (len(rows) - 1)).numpy(), rows.var(0, ddof=1), rtol=1e-10)
    assert skipped == [[f"bad-{s}", -1, "why"] for s in sorted(shards)]  # in shard id order
    # each shard's classes, recorded for the real-candidate selection's reads of kept latents
    held = RunState(OutputDir(str(tmp_path / "0"))).shard_classes()
    assert held == {s: sorted(set(shards[s][1].tolist())) for s in shards}


def test_a_killed_run_resumed_gives_the_uninterrupted_bits(tmp_path):
    shards = _shards()
    blocks = Blocks(tuple(sorted(shards)), 4)  # blocks of 4, 4, 4, 1 shards
    whole = RunState(OutputDir(str(tmp_path / "whole")))
    _feed(whole, blocks, shards, sorted(shards)).close()

    killed = RunState(OutputDir(str(tmp_path / "killed")))
    order = random.Random(0).sample(sorted(shards), 13)
    _feed(killed, blocks, shards, order[:7])  # the driver dies here: blocks in progress are lost, not written
    done = killed.finished_blocks()
    assert all(all(s in order[:7] for s in blocks.shards(b)) for b in done)
    todo = [s for s in order if blocks.of(s) not in done]  # what the rerun computes
    _feed(killed, blocks, shards, todo).close()
    a, b = _merged(whole, blocks), _merged(killed, blocks)
    assert torch.equal(a[0].n, b[0].n) and torch.equal(a[0].mu, b[0].mu) and torch.equal(a[0].m2, b[0].m2)
    assert np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_a_shard_twice_and_a_block_left_incomplete_are_refused(tmp_path):
    shards = _shards()
    blocks = Blocks(tuple(sorted(shards)), 4)
    writer = _feed(RunState(OutputDir(str(tmp_path))), blocks, shards, [4, 7])
    with pytest.raises(ValueError, match="shard 4 was given twice"):
        _feed(RunState(OutputDir(str(tmp_path))), blocks, shards, [4, 4])
    with pytest.raises(ValueError, match=r"block 0, 2 of 4 shards"):
        writer.close()


def test_shuffled_blocks_write_at_most_half_the_bytes_of_a_file_a_shard_and_sorted_no_more(tmp_path):
    """The issue's tiny shuffled shape (100 classes, 40 shards of 50) against today's layout (a block a shard)."""

    def state_bytes(folder, size, shuffled):
        rng = np.random.default_rng(0)
        ids = tuple(range(40))
        state = RunState(OutputDir(str(folder)))
        writer = BlockWriter(Blocks(ids, size), 16, state.write_block)
        for sid in ids:
            y = rng.integers(0, 100, 50) if shuffled else np.arange(sid * 50, sid * 50 + 50) * 100 // 2000
            x = rng.normal(size=(50, 16)).astype(np.float32)
            part = ClassStats(100, 16).update(torch.from_numpy(x), torch.from_numpy(y)).to_partial()
            writer.add(sid, part, {}, [])
        writer.close()
        return sum(p.stat().st_size for p in (folder / "_state" / "blocks").iterdir())

    size = block_size(40, 2000, 100)
    for shuffled in (True, False):
        per_shard = state_bytes(tmp_path / f"one-{shuffled}", 1, shuffled)
        blocked = state_bytes(tmp_path / f"blocks-{shuffled}", size, shuffled)
        assert blocked <= (per_shard / 2 if shuffled else per_shard), (shuffled, blocked, per_shard)


def test_in_order_arrival_holds_one_block_accumulator(tmp_path):
    shards = _shards(n_shards=12)
    blocks = Blocks(tuple(sorted(shards)), 4)
    writer = _feed(RunState(OutputDir(str(tmp_path))), blocks, shards, sorted(shards))
    # at most one accumulator of C rows at capacity <= 2 x the classes held, plus one waiting shard's partial
    one_acc = 2 * C * (8 + 2 * 8 * D)
    one_partial = 20 * (8 + 8 + 2 * 8 * D)
    assert writer.peak_bytes <= one_acc + one_partial
