"""pipeline/sources.py: listings, shards and the shard reader, with every kind of bad input."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from d3hr_ray.data.preprocess import ImageError, decode_image
from d3hr_ray.pipeline.sources import hf_class_names, list_source, read_shard

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(value: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def rows_of(listing):
    return [r for s in listing.shards for r in read_shard(s)]


def usable(row) -> bool:
    if row["reason"] or row["label"] < 0:
        return False
    try:
        decode_image(row["item"])
        return True
    except ImageError:
        return False


@pytest.fixture
def bad_label_parquet(tmp_path):
    """Rows 0-3 good; then a null image, a struct with null bytes, garbage bytes, labels 12, -1 and null."""
    images = [{"bytes": png(i * 40), "path": f"{i}.png"} for i in range(4)]
    images += [None, {"bytes": None, "path": "x.png"}, {"bytes": b"garbage", "path": "g.png"}, {"bytes": png(1), "path": "a"},
               {"bytes": png(2), "path": "b"}, {"bytes": png(3), "path": "c"}]
    labels = [0, 1, 2, 1, 0, 1, 2, 12, -1, None]
    meta = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"},
                                                             "label": {"names": ["T-shirt/top", "..", "ü ñ"], "_type": "ClassLabel"}}}})}
    table = pa.table({"image": pa.array(images, IMAGE), "label": pa.array(labels, pa.int64())}).replace_schema_metadata(meta)
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path


def test_parquet_bad_rows_are_kept_with_reasons_and_names_come_from_the_hf_metadata(bad_label_parquet):
    listing = list_source(str(bad_label_parquet), model_names=None, num_model_classes=None, shard_size=3)
    assert listing.names == {0: "T-shirt/top", 1: "..", 2: "ü ñ"}
    assert listing.counts == {0: 2, 1: 3, 2: 2}  # labels outside 0..2 and null belong to no class
    assert [(s["row_group"], s["start"], s["stop"]) for s in listing.shards] == [(0, 0, 3), (0, 3, 4), (1, 0, 3), (1, 3, 4), (2, 0, 2)]
    rows = rows_of(listing)
    assert len(rows) == 10  # nothing dropped
    assert [r["key"] for r in rows] == [f"bad.parquet:{i}" for i in range(10)]
    assert [usable(r) for r in rows] == [True] * 4 + [False] * 6
    reasons = [r["reason"] for r in rows]
    assert reasons[4] == reasons[5] == "no image data (null)"
    assert reasons[7] == "label 12 is outside 0..2" and reasons[8] == "label -1 is outside 0..2" and reasons[9] == "no label (null)"
    with pytest.raises(ImageError, match="not an image"):
        decode_image(rows[6]["item"])


def test_parquet_by_class_name_with_awkward_names_and_a_null_class(tmp_path):
    names = ["T-shirt/top", "..", ".hidden", "a b ü", "T-shirt/top", None]
    table = pa.table({"image": pa.array([{"bytes": png(i), "path": None} for i in range(6)], IMAGE), "class": names})
    pq.write_table(table, tmp_path / "c.parquet")
    listing = list_source(str(tmp_path), model_names=None, num_model_classes=None)
    assert sorted(listing.names.values()) == sorted({".hidden", "..", "T-shirt/top", "a b ü"})
    rows = rows_of(listing)
    assert len(rows) == 6 and rows[5]["reason"] == "no class (null)" and rows[5]["label"] == -1
    assert [listing.names[r["label"]] for r in rows[:5]] == names[:5]


def test_parquet_classes_subset_and_model_names_by_name(bad_label_parquet):
    # A model whose id2label holds the names in another order: labels map by name.
    listing = list_source(str(bad_label_parquet), model_names=["ü ñ", "T-shirt/top", ".."], num_model_classes=3, classes=["T-shirt/top"])
    assert listing.names == {1: "T-shirt/top"} and listing.counts == {1: 2}
    rows = rows_of(listing)
    # Rows of other classes are left out by request; the null image of this class and the bad labels are reported.
    assert [(r["key"], r["label"], r["reason"]) for r in rows] == [
        ("bad.parquet:0", 1, ""), ("bad.parquet:4", 1, "no image data (null)"), ("bad.parquet:7", -1, "label 12 is outside 0..2"),
        ("bad.parquet:8", -1, "label -1 is outside 0..2"), ("bad.parquet:9", -1, "no label (null)")]


def test_parquet_without_label_columns_is_refused(tmp_path):
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="'label' .* or 'class'"):
        list_source(str(tmp_path / "x.parquet"), model_names=None, num_model_classes=None)


def test_imagefolder_shards_are_per_class_runs_and_hidden_or_stray_entries_are_reported(tmp_path):
    root = tmp_path / "data"
    for name, n in (("cat", 5), ("dog ü", 2)):
        (root / name / "sub").mkdir(parents=True)
        for i in range(n):
            (root / name / ("sub" if i == 0 else "") / f"{i}.png").write_bytes(png(i))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(png(0))
    (root / "notes.txt").write_text("stray")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    listing = list_source(str(root), model_names=None, num_model_classes=None, shard_size=4)
    assert listing.names == {0: "cat", 1: "dog ü"} and listing.counts == {0: 6, 1: 2}
    assert [(s["label"], s["start"], s["stop"]) for s in listing.shards] == [(0, 0, 4), (0, 4, 6), (1, 0, 2)]
    reasons = dict(listing.skipped)
    assert reasons[f"{root}/notes.txt"] == "not inside a class folder"
    assert "hidden folder" in reasons[f"{root}/.cache/"]
    rows = rows_of(listing)
    assert [r["key"] for r in rows] == ["cat/1.png", "cat/2.png", "cat/3.png", "cat/4.png", "cat/broken.png", "cat/sub/0.png",
                                        "dog ü/1.png", "dog ü/sub/0.png"]
    assert [usable(r) for r in rows] == [True] * 4 + [False] + [True] * 3


def test_hf_class_names_reads_the_classlabel_or_nothing():
    schema = pa.schema([("label", pa.int64())], metadata={"huggingface": json.dumps(
        {"info": {"features": {"label": {"names": ["a", "b"], "_type": "ClassLabel"}}}})})
    assert hf_class_names(schema) == ["a", "b"]
    assert hf_class_names(pa.schema([("label", pa.int64())])) is None
    assert hf_class_names(pa.schema([("label", pa.int64())], metadata={"huggingface": "not json"})) is None


def test_digits_shards_cover_the_split_once():
    listing = list_source("digits:test", model_names=None, num_model_classes=10, shard_size=100)
    keys = [r["key"] for r in rows_of(listing)]
    assert len(keys) == len(set(keys)) == 449 == sum(listing.counts.values())
    assert all(int(k.split("/")[1]) % 4 == 3 for k in keys)
    assert np.all(np.diff([int(k.split("/")[1]) for k in keys]) > 0)


def test_the_read_path_does_not_import_torch():
    """Ray's read tasks run `sources.read_batches`: their worker processes must not load torch (memory, start-up)."""
    import subprocess
    import sys

    code = ("import sys, d3hr_ray.pipeline.sources as s; assert callable(s.read_batches); "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_still_exports_the_method_by_name():
    import d3hr_ray
    from d3hr_ray.stages.select import select_group
    from d3hr_ray.stages.stats import ClassStats

    assert d3hr_ray.select_group is select_group and d3hr_ray.ClassStats is ClassStats
    for name in d3hr_ray.__all__:
        assert getattr(d3hr_ray, name) is not None
    with pytest.raises(AttributeError):
        d3hr_ray.not_a_name  # noqa: B018


def test_keys_only_reads_no_image_and_only_reads_just_its_keys(tmp_path, bad_label_parquet, monkeypatch):
    """The random-real baseline's two narrow reads, for ImageFolder, Parquet and digits."""
    from d3hr_ray.pipeline import sources

    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(png(10 * i))
    listings = [list_source(str(root), model_names=None, num_model_classes=None, shard_size=2),
                list_source(str(bad_label_parquet), model_names=None, num_model_classes=None, shard_size=3),
                list_source("digits:test", model_names=None, num_model_classes=None, shard_size=100)]
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
        return [r for s in listing.shards for r in read_shard(dict(s, keys_only=True))]

    real_resolve = sources.resolve
    with monkeypatch.context() as m:  # ImageFolder: no file opened
        m.setattr(sources, "resolve", lambda uri: (lambda fs, path: (Watched(fs), path))(*real_resolve(uri)))
        keys = keys_of(listings[0])
        assert opened == []
        rows_of(listings[0])
        assert len(opened) == 6  # the watch sees a full read's opens
    real_read = pq.ParquetFile.read_row_group
    with monkeypatch.context() as m:  # Parquet: the label column alone
        m.setattr(pq.ParquetFile, "read_row_group", lambda self, i, columns=None, **k: read_columns.append(list(columns)) or real_read(self, i, columns=columns, **k))
        keys_pq = keys_of(listings[1])
        assert read_columns and all("image" not in c for c in read_columns)
        rows_of(listings[1])
        assert "image" in read_columns[-1]  # the watch sees a full read's columns
    keys_digits = keys_of(listings[2])
    for got, rows in zip((keys, keys_pq, keys_digits), full):
        assert [(r["label"], r["key"]) for r in got] == [(r["label"], r["key"]) for r in rows]

    # only: just the named keys, in listing order, each with the row a full read gives.
    for listing, rows in zip(listings, full):
        pick = {r["key"] for r in rows[1::2]}
        got = [r for s in listing.shards for r in read_shard(dict(s, only=sorted(pick)))]
        want = [r for r in rows if r["key"] in pick]
        assert [r["key"] for r in got] == [r["key"] for r in want] and len(got) == len(pick)
        assert all(r["reason"] == w["reason"] and r["label"] == w["label"] and repr(r["item"]) == repr(w["item"])
                   for r, w in zip(got, want))


@pytest.mark.parametrize("shard_size", [3, 100])
def test_per_class_subset_keeps_the_lowest_purpose_keyed_ranks_whatever_the_shards(tmp_path, shard_size):
    from d3hr_ray.pipeline.sources import list_source, per_class_subset, read_shard, shard_inputs
    from d3hr_ray.seeding import derive_seed

    listing = list_source("digits:train", model_names=None, num_model_classes=10, shard_size=shard_size)
    sub = per_class_subset(listing, 4, seed=9)
    rows = [r for s in sub.shards for r in read_shard(s)]
    assert sub.counts == dict.fromkeys(range(10), 4) and sub.listed == 1348
    assert sum(shard_inputs(s) for s in sub.shards) == len(rows) == 40
    assert {s["id"] for s in sub.shards} <= {s["id"] for s in listing.shards}  # ids kept: their state files stay theirs
    everything = [r for s in listing.shards for r in read_shard(dict(s, keys_only=True))]
    want = set()
    for c in range(10):
        mine = [r["key"] for r in everything if r["label"] == c]
        want |= set(sorted(mine, key=lambda k: derive_seed(9, "stats-subset", k))[:4])
    assert {r["key"] for r in rows} == want
    other = per_class_subset(listing, 4, seed=10)
    assert {k for s in other.shards for k in s["only"]} != want
