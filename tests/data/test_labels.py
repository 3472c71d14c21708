"""data/labels.py: integer labels counted by the listing and resolved per row by the reader, one way for three kinds."""

import json
from collections import Counter

from d3hr_ray.data.labels import LabelCounts, ShardLabels, count_integer_labels, count_labels
from d3hr_ray.data.listing import ListRequest
from d3hr_ray.data.parquet import ParquetShard
from d3hr_ray.data.sources import shard_from_json


def shard(keep=(0, 2)) -> ParquetShard:
    labels = ShardLabels(labels={"0": 0, "1": 1, "2": 2}, valid="0..2", keep=keep)
    return ParquetShard(id=0, uri="d", start=0, stop=9, file="f", row_group=0, offset=0, column="label", **labels)


def test_label_of_a_kept_class_a_missing_label_one_outside_and_a_class_left_out():
    s = shard()
    assert s.label_of(2) == (2, "") and s.label_of("0") == (0, "")  # the value as text: int or str columns alike
    assert s.label_of(None) == (-1, "no label (null)")
    assert s.label_of(None, name="class", missing=".cls or .json") == (-1, "no class (.cls or .json)")
    assert s.label_of(7) == (-1, "label 7 is outside 0..2")
    assert s.label_of(-1, name="class") == (-1, "class -1 is outside 0..2")
    assert s.label_of(1) is None  # a class --classes leaves out: skipped by request, no reason to report


def test_a_labelled_shard_travels_as_json_with_its_label_fields_only():
    s = shard()
    s.label_of(0)  # fills the cached set of kept classes: not a field, never in the record
    d = json.loads(s.to_json())
    assert d["labels"] == {"0": 0, "1": 1, "2": 2} and d["valid"] == "0..2" and d["keep"] == [0, 2]
    assert "_kept" not in d
    back = shard_from_json(s.to_json())
    assert back == s and back.label_of(1) is None and back.label_of(2) == (2, "")


def test_count_labels_counts_the_kept_classes_by_model_id():
    values = Counter({0: 3, 1: 2, 2: 5, None: 4, 9: 1})  # None: rows without a label; 9: outside the data's classes
    ids = {"cat": 2, "dog": 0, "fox": 1}
    labels = {"0": 2, "1": 0, "2": 1}
    got = count_labels(values, ids, labels, "0..2", ["cat", "1"])
    assert got == LabelCounts(
        names={1: "fox", 2: "cat"},
        counts={1: 5, 2: 3},
        shard=ShardLabels(labels=labels, valid="0..2", keep=(1, 2)),
    )
    every = count_labels(values, ids, labels, "0..2", None)
    assert every.counts == {0: 2, 1: 5, 2: 3} and every.shard["keep"] == (0, 1, 2)


def test_count_integer_labels_names_them_and_maps_them_to_the_model():
    values = Counter({0: 4, 1: 6})
    unnamed = count_integer_labels(values, None, ListRequest(model_names=None, num_model_classes=None))
    assert unnamed.names == {0: "0", 1: "1"} and unnamed.counts == {0: 4, 1: 6}
    # Named labels map to the model by name: label 0 ("b") is the model's class 1.
    named = count_integer_labels(values, ["b", "a"], ListRequest(model_names=["a", "b"], num_model_classes=2))
    assert named.names == {0: "a", 1: "b"} and named.counts == {0: 6, 1: 4}
    assert named.shard == ShardLabels(labels={"0": 1, "1": 0}, valid="0..1", keep=(0, 1))
