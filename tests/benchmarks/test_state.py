"""benchmarks/state.py: the rows it prints against bytes counted here from the synthetic shards themselves."""

import re

import torch

from benchmarks.__main__ import main
from benchmarks.state import SHAPES, shard_batches


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (sorted|shuffled) \| (shards|blocks) \(", line)
        if m:
            rows[m.groups()] = [c.strip() for c in line.strip("|").split("|")]
    return rows


def _mb(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"MB": 1e6, "GB": 1e9}[unit]


def test_the_state_benchmark_counts_what_the_layouts_write(capsys, tmp_path):
    images, classes, shard_size, dim = SHAPES["tiny"]
    assert main(["state", "--shape", "tiny", "--dim", "32", "--root", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {(o, lay) for o in ("sorted", "shuffled") for lay in ("shards", "blocks")}
    for order in ("sorted", "shuffled"):
        # A file a shard: each holds its classes' count, mean and M2 rows (plus the class ids), and a small header.
        rows_of = [len(torch.unique(y)) for _, _, y in shard_batches(images, classes, shard_size, 32, order)]
        tensors = sum(k * (16 * 32 + 16) for k in rows_of)
        written = _mb(rows[order, "shards"][3])
        assert tensors <= written + 5e3 and written <= tensors + 1e3 * len(rows_of), (order, written, tensors)
        assert rows[order, "shards"][2] == str(len(rows_of))
        assert rows[order, "blocks"][2] == "5"  # blocks.block_size(40, 2000, 100) = 8 shards a block
    # The target on this shape: blocks peak at most half the per-shard files on shuffled data, no more
    # on sorted data.
    assert _mb(rows["shuffled", "blocks"][4]) <= _mb(rows["shuffled", "shards"][4]) / 2
    assert _mb(rows["sorted", "blocks"][4]) <= _mb(rows["sorted", "shards"][4])
