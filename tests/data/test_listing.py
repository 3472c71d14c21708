"""data/listing.py: the class mapping, --classes, the runs a listing is cut into, the Shard record, the fingerprint."""

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from d3hr_ray.data.listing import Listing, Shard, map_classes, runs, select_classes


@dataclass(frozen=True, kw_only=True)
class ToyShard(Shard):
    """A kind's record as data/imagefolder.py, parquet.py and digits.py write theirs: a kind and fields of its own."""

    kind: ClassVar[str] = "toy"
    file: str
    labels: dict[str, int]


def test_map_classes_without_a_model_takes_the_sources_order():
    assert map_classes(["b", "a", "c"], None, None) == {"b": 0, "a": 1, "c": 2}
    assert map_classes(["b", "a"], ["a", "b"], None) == {"b": 0, "a": 1}  # no model yet: its names are not read


def test_map_classes_by_name_when_the_model_names_them_all():
    model = ["plane", "car", "bird", "cat", "deer"]
    assert map_classes(["cat", "plane"], model, 5) == {"cat": 3, "plane": 0}
    # The same names in another order: by name, not by position, though the counts match.
    assert map_classes(model[::-1], model, 5) == {n: 4 - i for i, n in enumerate(model[::-1])}


def test_map_classes_by_position_when_the_counts_match():
    assert map_classes(["x", "y", "z"], ["a", "b", "c"], 3) == {"x": 0, "y": 1, "z": 2}
    assert map_classes(["x", "y"], None, 2) == {"x": 0, "y": 1}  # a model with no id2label
    assert map_classes(["x", "y"], [], 2) == {"x": 0, "y": 1}


def test_map_classes_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match=r"--data has 2 classes \(x, y\) but the model has 3 named a, b, c;"):
        map_classes(["x", "y"], ["a", "b", "c"], 3)
    with pytest.raises(ValueError, match=r"--data has 7 classes \(c0, c1, c2, c3, c4, \.\.\.\) but the model has 3;"):
        map_classes([f"c{i}" for i in range(7)], None, 3)
    with pytest.raises(ValueError, match=r"named m0, m1, m2, m3, m4, \.\.\.;"):
        map_classes(["x"], [f"m{i}" for i in range(6)], 6)
    with pytest.raises(ValueError, match="model has 2"):  # some names known, one not: neither by name nor by position
        map_classes(["a", "zebra", "b"], ["a", "b"], 2)


def test_select_classes_every_class_in_id_order_by_default():
    assert select_classes({"dog": 2, "cat": 0, "bird": 1}, None) == {0: "cat", 1: "bird", 2: "dog"}
    assert list(select_classes({"dog": 2, "cat": 0, "bird": 1}, None)) == [0, 1, 2]


def test_select_classes_by_name_or_id():
    ids = {"dog": 5, "cat": 3, "bird": 9}
    got = select_classes(ids, ["bird", "3"])
    assert got == {3: "cat", 9: "bird"} and list(got) == [3, 9]  # sorted by model id, whatever the flag's order
    assert select_classes(ids, ["5", "dog"]) == {5: "dog"}  # the same class twice is one class
    # A name that looks like an id is read as the name first: class "1" is model id 0 here.
    assert select_classes({"1": 0, "0": 1}, ["1"]) == {0: "1"}


@pytest.mark.parametrize("bad", ["horse", "4", "-3", "Cat"])
def test_select_classes_names_what_it_does_not_know(bad):
    with pytest.raises(ValueError, match=f"--classes: '{bad}' is neither a class name nor a class id"):
        select_classes({"dog": 5, "cat": 3}, ["cat", bad])


@pytest.mark.parametrize("n,size", [(0, 4), (1, 4), (8, 4), (10, 4), (10, 3), (3, 10), (1024, 1024), (2049, 1024)])
def test_runs_cut_range_into_consecutive_runs(n, size):
    got = runs(n, size)
    flat = [i for start, stop in got for i in range(start, stop)]
    assert flat == list(range(n))  # consecutive, every index once
    assert all(0 < stop - start <= size for start, stop in got)
    assert all(stop - start == size for start, stop in got[:-1])  # only the last run is short
    assert len(got) == -(-n // size)


def test_shard_inputs_narrowed_and_keys_pass():
    s = ToyShard(id=3, uri="data/", start=10, stop=17, file="f.parquet", labels={"0": 1})
    assert s.inputs == 7 and s.only is None and s.keys_only is False
    n = s.narrowed({"k9", "k1", "k5"})
    assert n.only == ("k1", "k5", "k9") and n.inputs == 3
    assert isinstance(n, ToyShard) and dataclasses.replace(n, only=None) == s  # nothing else changed
    assert s.only is None  # the record is frozen: narrowing makes a new one
    assert s.narrowed([]).inputs == 0  # narrowed to nothing reads nothing, not the whole run
    k = n.keys_pass()
    assert k.keys_only is True and k.only == n.only and dataclasses.replace(k, keys_only=False) == n
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 0


def test_shard_to_json_holds_its_kind_and_every_field():
    s = ToyShard(id=2, uri="s3://b/d", start=0, stop=4, file="f.parquet", labels={"cat": 3}).narrowed(["b", "a"])
    assert json.loads(s.keys_pass().to_json()) == {
        "kind": "toy",
        "id": 2,
        "uri": "s3://b/d",
        "start": 0,
        "stop": 4,
        "only": ["a", "b"],
        "keys_only": True,
        "file": "f.parquet",
        "labels": {"cat": 3},
    }
    base = Shard(id=0, uri="u", start=5, stop=6)
    assert json.loads(base.to_json()) == {
        "kind": "",
        "id": 0,
        "uri": "u",
        "start": 5,
        "stop": 6,
        "only": None,
        "keys_only": False,
    }


def test_listing_fingerprint_is_the_kind_the_shard_count_and_the_counts_by_name():
    shards = [Shard(id=i, uri="d", start=a, stop=b) for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 9)])]
    listing = Listing(
        kind="imagefolder",
        uri="d",
        names={7: "cat", 2: "dog", 4: "bird"},
        counts={7: 5, 2: 1, 4: 3},
        shards=shards,
        native_size=32,
        skipped=[("d/x.txt", "not an image")],
    )
    fp = listing.fingerprint
    assert fp == {"kind": "imagefolder", "shards": 3, "counts": {"dog": 1, "bird": 3, "cat": 5}}
    assert list(fp["counts"]) == ["dog", "bird", "cat"]  # model id order
    # What a resume compares: it survives JSON, and neither the location, the probe nor the refusals enter it.
    assert json.loads(json.dumps(fp)) == fp
    moved = dataclasses.replace(listing, uri="s3://elsewhere/d", native_size=None, skipped=[], listed=100)
    assert moved.fingerprint == fp
    assert dataclasses.replace(listing, counts={7: 5, 2: 2, 4: 3}).fingerprint != fp
    assert dataclasses.replace(listing, shards=shards[:2]).fingerprint != fp
    assert dataclasses.replace(listing, kind="parquet").fingerprint != fp
