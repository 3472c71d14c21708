"""data/sources.py: the registry, narrow reads (keys only, some keys), the per-class subset, a torch-free read path."""

import pyarrow.parquet as pq
import pytest

from d3hr_ray.data.sources import list_source, read_shard
from tests.data.conftest import png, rows_of


def test_the_config_the_listing_and_the_read_path_load_no_torch(tmp_path):
    """The torch-free boundary: a config parses, --data lists and Ray's read tasks (`sources.read_batches`) read
    without loading torch, diffusers or Ray: a bad flag fails fast, a read task's worker stays small. The other
    jobs' Ray Data task functions (finetune's and evaluate's rows, the real candidates' PNGs) load none either."""
    import subprocess
    import sys

    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(png(60 * i))
    code = f"""
import json, sys
import d3hr_ray.cli, d3hr_ray.flags, d3hr_ray.tracking, d3hr_ray.data.listing
from d3hr_ray.config import DistillConfig
from d3hr_ray.data.sources import list_source, read_batches
from d3hr_ray.flags import config_from_args
cfg = config_from_args(DistillConfig, ["--data", {str(root)!r}, "--strict"])
listing = list_source(cfg.data, model_names=None, num_model_classes=None, shard_size=3)
rows = list(read_batches({{"shard": [s.to_json() for s in listing.shards]}}, resolution=4, batch_size=2))
assert sum(len(json.loads(r["meta"][0])["keys"]) for r in rows) == 4, rows
from d3hr_ray.data.preprocess import png_batch, preprocess_batch, training_rows
from d3hr_ray.evaluation.data import classifier_rows
print(sorted(m for m in ("torch", "diffusers", "ray") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_keys_only_reads_no_image_and_only_reads_just_its_keys(tmp_path, bad_label_parquet, monkeypatch):
    """The random-real baseline's two narrow reads, for ImageFolder, Parquet and digits."""
    from d3hr_ray.data import imagefolder

    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(png(10 * i))
    listings = [
        list_source(str(root), model_names=None, num_model_classes=None, shard_size=2),
        list_source(str(bad_label_parquet), model_names=None, num_model_classes=None, shard_size=3),
        list_source("digits:test", model_names=None, num_model_classes=None, shard_size=100),
    ]
    full = [rows_of(listing) for listing in listings]

    # keys_only: every row's label and key, in listing order, and no file opened, no image column read.
    opened, read_columns = [], []

    class Watched:
        """The real filesystem, with its file opens recorded."""

        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_input_stream(self, path, *a, **k):
            opened.append(path)
            return self.fs.open_input_stream(path, *a, **k)

    def keys_of(listing):
        return [r for s in listing.shards for r in read_shard(s.keys_pass())]

    real_resolve = imagefolder.resolve
    with monkeypatch.context() as m:  # ImageFolder: no file opened
        m.setattr(imagefolder, "resolve", lambda uri: (lambda fs, path: (Watched(fs), path))(*real_resolve(uri)))
        keys = keys_of(listings[0])
        assert opened == []
        rows_of(listings[0])
        assert len(opened) == 6  # the watch sees a full read's opens
    real_read = pq.ParquetFile.read_row_group
    with monkeypatch.context() as m:  # Parquet: the label column alone
        m.setattr(
            pq.ParquetFile,
            "read_row_group",
            lambda self, i, columns=None, **k: (
                read_columns.append(list(columns)) or real_read(self, i, columns=columns, **k)
            ),
        )
        keys_pq = keys_of(listings[1])
        assert read_columns and all("image" not in c for c in read_columns)
        rows_of(listings[1])
        assert "image" in read_columns[-1]  # the watch sees a full read's columns
    keys_digits = keys_of(listings[2])
    for got, rows in zip((keys, keys_pq, keys_digits), full, strict=True):
        assert [(r["label"], r["key"]) for r in got] == [(r["label"], r["key"]) for r in rows]

    # only: just the named keys, in listing order, each with the row a full read gives.
    for listing, rows in zip(listings, full, strict=True):
        pick = {r["key"] for r in rows[1::2]}
        got = [r for s in listing.shards for r in read_shard(s.narrowed(pick))]
        want = [r for r in rows if r["key"] in pick]
        assert [r["key"] for r in got] == [r["key"] for r in want] and len(got) == len(pick)
        assert all(
            r["reason"] == w["reason"] and r["label"] == w["label"] and repr(r["item"]) == repr(w["item"])
            for r, w in zip(got, want, strict=True)
        )


@pytest.mark.parametrize("shard_size", [3, 100])
def test_per_class_subset_keeps_the_lowest_purpose_keyed_ranks_whatever_the_shards(tmp_path, shard_size):
    from d3hr_ray.data.sources import per_class_subset
    from d3hr_ray.seeding import derive_seed

    listing = list_source("digits:train", model_names=None, num_model_classes=10, shard_size=shard_size)
    sub = per_class_subset(listing, 4, seed=9)
    rows = [r for s in sub.shards for r in read_shard(s)]
    assert sub.counts == dict.fromkeys(range(10), 4) and sub.listed == 1348
    assert sum(s.inputs for s in sub.shards) == len(rows) == 40
    assert {s.id for s in sub.shards} <= {s.id for s in listing.shards}  # ids kept: their state files stay theirs
    everything = [r for s in listing.shards for r in read_shard(s.keys_pass())]
    want = set()
    for c in range(10):
        mine = [r["key"] for r in everything if r["label"] == c]
        want |= set(sorted(mine, key=lambda k: derive_seed(9, "stats-subset", k))[:4])
    assert {r["key"] for r in rows} == want
    other = per_class_subset(listing, 4, seed=10)
    assert {k for s in other.shards for k in s.only} != want


def test_shard_records_travel_as_json():
    from d3hr_ray.data.sources import shard_from_json

    for uri in ("digits:test",):
        for shard in list_source(uri, model_names=None, num_model_classes=10, shard_size=100).shards:
            for variant in (shard, shard.keys_pass(), shard.narrowed(["digits/3", "digits/7"])):
                back = shard_from_json(variant.to_json())
                assert back == variant and type(back) is type(variant)


def test_read_class_map_from_csv_or_json(tmp_path):
    from d3hr_ray.data.sources import read_class_map

    (tmp_path / "m.csv").write_text('# data class,model class\nmy cats,tabby\n\n"a, b",7\n')
    assert read_class_map(str(tmp_path / "m.csv")) == {"my cats": "tabby", "a, b": "7"}
    (tmp_path / "m.json").write_text('{"my cats": 281, "dogs": "Samoyed"}')
    assert read_class_map(str(tmp_path / "m.json")) == {"my cats": 281, "dogs": "Samoyed"}
    assert read_class_map(None) is None
    (tmp_path / "bad.csv").write_text("a,1\nb\n")
    with pytest.raises(ValueError, match="line 2 has 1 fields"):
        read_class_map(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.json").write_text('{"a": [1]}')
    with pytest.raises(ValueError, match="expected an object of data class -> model class id or name"):
        read_class_map(str(tmp_path / "bad.json"))
