"""workers/datasets.py on the tests' Ray: the Ray Datasets read exactly what the data layer's readers yield."""

import numpy as np

from d3hr_ray.data.sources import list_source, read_shard
from d3hr_ray.workers.datasets import keys_dataset, open_listing, rows_dataset


def _rows(ds) -> list[tuple]:
    out = []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(b["key"])):
            out.append(tuple(b[k][i] if k != "item" else repr(b[k][i]) for k in sorted(b)))
    return sorted(out, key=lambda r: str(r))


def test_rows_and_keys_datasets_equal_the_readers(ray_local):
    listing = list_source("digits:test", model_names=None, num_model_classes=10, shard_size=100)
    want_rows, want_keys = [], []
    for shard in listing.shards:
        for r in read_shard(shard):
            want_rows.append({**r, "item": repr(r["item"]), "shard": shard.id})
            want_keys.append({"label": r["label"], "key": r["key"], "shard": shard.id})
    rows = [
        dict(zip(["item", "key", "label", "reason", "shard"], r, strict=True))
        for r in _rows(rows_dataset(listing.shards))
    ]
    assert sorted(rows, key=lambda r: r["key"]) == sorted(want_rows, key=lambda r: r["key"])
    keys = [dict(zip(["key", "label", "shard"], r, strict=True)) for r in _rows(keys_dataset(listing.shards))]
    assert sorted(keys, key=lambda r: r["key"]) == sorted(want_keys, key=lambda r: r["key"])
    # A narrowed shard reads its keys alone.
    pick = [r["key"] for r in want_rows[::50]]
    narrowed = [
        s.narrowed([k for k in pick if k in {r["key"] for r in read_shard(s.keys_pass())}]) for s in listing.shards
    ]
    got = {r[1] for r in _rows(rows_dataset([s for s in narrowed if s.only]))}
    assert got == set(pick)


def test_open_listing_reads_what_was_listed(ray_local):
    src = open_listing(list_source("digits:train", model_names=None, num_model_classes=10, classes=["3", "8"]))
    assert src.names == {3: "3", 8: "8"} and src.native_size == 8
    labels = np.concatenate([b["label"] for b in src.dataset.iter_batches(batch_format="numpy")])
    assert sorted(set(labels.tolist())) == [3, 8] and len(labels) == sum(src.listing.counts.values())
