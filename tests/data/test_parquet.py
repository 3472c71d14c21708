"""data/parquet.py: Hugging Face image Parquet, by label id or class name, with every kind of bad row."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d3hr_ray.data.parquet import hf_class_names
from d3hr_ray.data.preprocess import ImageError, decode_image
from d3hr_ray.data.sources import list_source
from tests.data.conftest import IMAGE, png, rows_of, usable


def test_parquet_bad_rows_are_kept_with_reasons_and_names_come_from_the_hf_metadata(bad_label_parquet):
    listing = list_source(str(bad_label_parquet), model_names=None, num_model_classes=None, shard_size=3)
    assert listing.names == {0: "T-shirt/top", 1: "..", 2: "ü ñ"}
    assert listing.counts == {0: 2, 1: 3, 2: 2}  # labels outside 0..2 and null belong to no class
    assert [(s.row_group, s.start, s.stop) for s in listing.shards] == [
        (0, 0, 3),
        (0, 3, 4),
        (1, 0, 3),
        (1, 3, 4),
        (2, 0, 2),
    ]
    rows = rows_of(listing)
    assert len(rows) == 10  # nothing dropped
    assert [r["key"] for r in rows] == [f"bad.parquet:{i}" for i in range(10)]
    assert [usable(r) for r in rows] == [True] * 4 + [False] * 6
    reasons = [r["reason"] for r in rows]
    assert reasons[4] == reasons[5] == "no image data (null)"
    assert (
        reasons[7] == "label 12 is outside 0..2"
        and reasons[8] == "label -1 is outside 0..2"
        and reasons[9] == "no label (null)"
    )
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
    listing = list_source(
        str(bad_label_parquet), model_names=["ü ñ", "T-shirt/top", ".."], num_model_classes=3, classes=["T-shirt/top"]
    )
    assert listing.names == {1: "T-shirt/top"} and listing.counts == {1: 2}
    rows = rows_of(listing)
    # Rows of other classes are left out by request; the null image of this class and the bad labels are reported.
    assert [(r["key"], r["label"], r["reason"]) for r in rows] == [
        ("bad.parquet:0", 1, ""),
        ("bad.parquet:4", 1, "no image data (null)"),
        ("bad.parquet:7", -1, "label 12 is outside 0..2"),
        ("bad.parquet:8", -1, "label -1 is outside 0..2"),
        ("bad.parquet:9", -1, "no label (null)"),
    ]


def test_parquet_without_label_columns_is_refused(tmp_path):
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="'label' .* or 'class'"):
        list_source(str(tmp_path / "x.parquet"), model_names=None, num_model_classes=None)


def test_hf_class_names_reads_the_classlabel_or_nothing():
    schema = pa.schema(
        [("label", pa.int64())],
        metadata={
            "huggingface": json.dumps({"info": {"features": {"label": {"names": ["a", "b"], "_type": "ClassLabel"}}}})
        },
    )
    assert hf_class_names(schema) == ["a", "b"]
    assert hf_class_names(pa.schema([("label", pa.int64())])) is None
    assert hf_class_names(pa.schema([("label", pa.int64())], metadata={"huggingface": "not json"})) is None
