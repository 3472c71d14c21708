"""data/subset.py: a class's K keys of lowest purpose-keyed rank, whatever the stream's order, batching or shards.

The random-real wrapper (evaluation/data.py) has its own tests in tests/evaluation/test_data.py; these test the
general function: any purpose, shard ids, rows of no class, classes with fewer than K.
"""

import numpy as np
import pytest

from d3hr_ray.data.subset import lowest_ranked
from d3hr_ray.seeding import derive_seed


def _rows(n_per_class: dict[int, int], stray: int = 0) -> list[tuple[int, str, int]]:
    """(label, key, shard) rows: n keys of each class, `stray` rows of no class (label -1), shards of 5 rows."""
    rows = [(c, f"c{c}/img{i:03d}.png", 0) for c, n in n_per_class.items() for i in range(n)]
    rows += [(-1, f"stray{i}.png", 0) for i in range(stray)]
    return [(label, key, i // 5) for i, (label, key, _) in enumerate(rows)]


def _batches(rows, size: int, with_shard: bool = True):
    """The stream lowest_ranked reads: dicts of numpy columns, `size` rows each."""
    for s in range(0, len(rows), size):
        part = rows[s : s + size]
        b = {"label": np.array([r[0] for r in part], dtype=np.int64), "key": [r[1] for r in part]}
        if with_shard:
            b["shard"] = np.array([r[2] for r in part], dtype=np.int64)
        yield b


def _expected(rows, k: int, seed: int, purpose: str) -> dict[str, tuple[int, int]]:
    """Each class's k keys of lowest derive_seed(seed, purpose, key), by a full sort (no heap)."""
    out = {}
    for c in sorted({r[0] for r in rows if r[0] >= 0}):
        mine = sorted((derive_seed(seed, purpose, key), key, shard) for label, key, shard in rows if label == c)
        out |= {key: (c, shard) for _, key, shard in mine[:k]}
    return out


@pytest.mark.parametrize("purpose", ["stats-subset", "random-real", "anything else"])
@pytest.mark.parametrize("seed", [0, 12345])
def test_each_class_keeps_its_k_lowest_ranks(purpose, seed):
    rows = _rows({0: 23, 3: 17, 8: 40}, stray=6)
    chosen, short = lowest_ranked(_batches(rows, 7), 6, seed, purpose)
    assert chosen == _expected(rows, 6, seed, purpose) and short == {}
    assert sorted(c for c, _ in chosen.values()) == [0] * 6 + [3] * 6 + [8] * 6


def test_the_same_subset_for_any_order_and_batching():
    rows = _rows({0: 30, 1: 30, 2: 11}, stray=4)
    want = _expected(rows, 5, 9, "stats-subset")
    for order_seed, size in [(0, 1), (1, 4), (2, 13), (3, 1000)]:
        perm = np.random.default_rng(order_seed).permutation(len(rows))
        got, _ = lowest_ranked(_batches([rows[i] for i in perm], size), 5, 9, "stats-subset")
        assert got == want, (order_seed, size)
    # Empty batches (a shard with no rows) change nothing.
    empty = {"label": np.zeros(0, dtype=np.int64), "key": [], "shard": np.zeros(0, dtype=np.int64)}
    got, _ = lowest_ranked([empty, *_batches(rows, 9), empty], 5, 9, "stats-subset")
    assert got == want


def test_the_purpose_names_the_stream():
    rows = _rows({0: 50, 1: 50})
    stats, _ = lowest_ranked(_batches(rows, 8), 5, 0, "stats-subset")
    real, _ = lowest_ranked(_batches(rows, 8), 5, 0, "random-real")
    assert stats == _expected(rows, 5, 0, "stats-subset") and real == _expected(rows, 5, 0, "random-real")
    assert set(stats) != set(real)  # the same seed, two purposes: two subsets
    first = {key for c in (0, 1) for key in [r[1] for r in rows if r[0] == c][:5]}
    assert set(stats) != first and set(real) != first  # neither is the first K keys of each class


def test_rows_of_no_class_are_never_chosen():
    rows = _rows({2: 3}, stray=20)
    chosen, short = lowest_ranked(_batches(rows, 6), 10, 1, "stats-subset")
    assert set(chosen) == {r[1] for r in rows if r[0] == 2}
    assert short == {2: 3}  # -1 is not a class: not reported short either
    chosen, short = lowest_ranked(_batches(_rows({}, stray=5), 2), 3, 1, "stats-subset")
    assert chosen == {} and short == {}


def test_each_chosen_key_keeps_its_shard_id():
    rows = _rows({0: 12, 1: 12})
    assert {r[2] for r in rows} == {0, 1, 2, 3, 4}
    chosen, _ = lowest_ranked(_batches(rows, 5), 4, 2, "stats-subset")
    shard_of = {key: shard for _, key, shard in rows}
    assert chosen and all(shard == shard_of[key] for key, (_, shard) in chosen.items())
    # A stream without shard ids: the same keys, each with shard -1.
    plain, _ = lowest_ranked(_batches(rows, 5, with_shard=False), 4, 2, "stats-subset")
    assert plain == {key: (c, -1) for key, (c, _) in chosen.items()}


def test_classes_with_fewer_than_k_are_reported_with_what_they_had():
    rows = _rows({0: 10, 1: 3, 4: 1, 5: 4})
    chosen, short = lowest_ranked(_batches(rows, 3), 4, 0, "stats-subset")
    assert short == {1: 3, 4: 1}  # class 5 has exactly K: not short
    assert chosen == _expected(rows, 4, 0, "stats-subset")
    assert {key for key, (c, _) in chosen.items() if c in (1, 4, 5)} == {r[1] for r in rows if r[0] in (1, 4, 5)}


def test_keys_and_labels_of_any_array_type():
    """Labels as numpy ints or a plain list, keys as an object array: the result holds plain ints and strings."""
    rows = _rows({0: 8, 1: 8})
    batches = [
        {"label": [r[0] for r in rows[:9]], "key": np.array([r[1] for r in rows[:9]], dtype=object)},
        {"label": np.array([r[0] for r in rows[9:]], dtype=np.int32), "key": [r[1] for r in rows[9:]]},
    ]
    chosen, _ = lowest_ranked(batches, 3, 4, "stats-subset")
    assert chosen == {key: (c, -1) for key, (c, _) in _expected(rows, 3, 4, "stats-subset").items()}
    assert all(type(k) is str and type(c) is int and type(s) is int for k, (c, s) in chosen.items())
