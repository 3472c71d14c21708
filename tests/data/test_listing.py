"""data/listing.py: the class mapping, --classes, the runs a listing is cut into, the Shard record, the fingerprint."""

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from d3hr_ray.data.listing import (
    IMAGENET_CLASSES,
    WNID,
    Listing,
    Shard,
    imagenet_wnids,
    integer_label_ids,
    map_classes,
    runs,
    select_classes,
)


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


def _imagenet():
    """(torchvision's 1,000 ImageNet category names in class-id order, Imagenette's wnid -> its English names)."""
    from torchvision.datasets.imagenette import Imagenette
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1.meta["categories"], Imagenette._WNID_TO_CLASS


def test_the_shipped_wnid_list_is_the_1000_sorted_ilsvrc_ids():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == IMAGENET_CLASSES == 1000
    assert wnids == sorted(wnids) and all(WNID.fullmatch(w) for w in wnids)
    assert (wnids[0], wnids[-1]) == ("n01440764", "n15075141")  # tench, toilet tissue


def test_wnid_classes_map_by_the_ilsvrc_order_whatever_the_subset():
    categories, imagenette = _imagenet()
    # Imagenette's wnids, out of order: each lands on the class torchvision's weights call by Imagenette's name.
    source = sorted(imagenette, reverse=True)
    ids = map_classes(source, categories, 1000)
    assert {w: categories[i] for w, i in ids.items()} == {w: names[0] for w, names in imagenette.items()}
    assert map_classes(["n01443537"], categories, 1000) == {"n01443537": 1}  # goldfish, alone
    # The wnid rule needs a 1,000-class model: for any other, wnids are names like any other.
    assert map_classes(["n01443537", "n01440764"], None, 2) == {"n01443537": 0, "n01440764": 1}


def test_the_class_map_wins_and_takes_ids_or_names():
    model = ["plane", "car", "bird", "cat"]
    # "cat" is also a model name, but the map sends it elsewhere; ids come as ints or digits.
    got = map_classes(["cat", "kitty", "auto"], model, 4, {"cat": 2, "kitty": "cat", "auto": "1", "unused": 0})
    assert got == {"cat": 2, "kitty": 3, "auto": 1}
    wnid_map = {"n01440764": "3"}  # a map overrides the ILSVRC order too
    assert map_classes(["n01440764"], None, 1000, wnid_map) == {"n01440764": 3}


def test_unmapped_classes_are_listed_in_one_line():
    categories, _ = _imagenet()
    with pytest.raises(ValueError) as e:
        map_classes(["n01440764", "my_cats", "n01443537", "dogs too"], categories, 1000)
    msg = str(e.value)
    assert "\n" not in msg and "2 map to no class of the model: my_cats, dogs too;" in msg and "--class-map" in msg
    with pytest.raises(ValueError) as e:
        map_classes(["a", "b", "c"], ["x", "y"], 2, {"b": 0})
    assert "\n" not in str(e.value) and "2 map to no class of the model: a, c;" in str(e.value)  # b is mapped


def test_the_class_map_refuses_targets_that_are_not_model_classes():
    with pytest.raises(
        ValueError, match=r"2 target\(s\) are not a class of the model \(ids 0\.\.1 or its class names\)"
    ):
        map_classes(["a", "b"], ["x", "y"], 2, {"a": 2, "b": "zebra"})
    with pytest.raises(ValueError, match="'a' and 'b' map to the same model class 1"):
        map_classes(["a", "b"], ["x", "y"], 2, {"a": 1, "b": "y"})
    with pytest.raises(ValueError, match="'n01440764' and 'cat' map to the same model class 0"):  # map and wnid rule
        map_classes(["n01440764", "cat"], None, 1000, {"cat": 0})


def test_a_class_map_covers_some_classes_and_the_rules_map_the_rest():
    assert map_classes(["n01443537", "my cats"], None, 1000, {"my cats": "281"}) == {"n01443537": 1, "my cats": 281}
    assert map_classes(["b", "z"], ["a", "b", "c"], 3, {"z": "a"}) == {"b": 1, "z": 0}
    assert map_classes(["p"], None, 2, {"p": 1}) == {"p": 1}  # every class mapped: no rule needed
    with pytest.raises(ValueError, match="1 map to no class of the model: q;"):  # no position rule beside a map
        map_classes(["p", "q"], None, 2, {"p": 1})


def test_integer_labels_go_through_the_class_map_and_wnid_names():
    # Unnamed labels 0 and 2: the map's keys are the labels as text.
    ids, labels, _ = integer_label_ids({0: 5, 2: 1}, None, ["x", "y", "z", "w"], 4, {"0": 3, "1": 0, "2": "y"})
    assert labels == {"0": 3, "1": 0, "2": 1}
    # Labels named by wnids (a classes.txt, HF ClassLabel names) on a 1,000-class model: the ILSVRC order.
    ids, labels, _ = integer_label_ids({0: 1, 1: 1}, ["n15075141", "n01440764"], None, 1000)
    assert labels == {"0": 999, "1": 0} and ids == {"n15075141": 999, "n01440764": 0}
