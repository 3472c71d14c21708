"""data/hf_disk.py: datasets saved by the `datasets` library itself (save_to_disk), read back row for row."""

import numpy as np
import pytest
from PIL import Image

from d3hr_ray.data.preprocess import to_pixels
from d3hr_ray.data.sources import list_source, read_shard, source_kind
from tests.data.conftest import rows_of


@pytest.fixture
def saved(tmp_path):
    """12 images of 3 ClassLabel classes in 3 Arrow files, one row with a null image, saved by `datasets`."""
    import datasets

    pixels = [np.full((6, 5, 3), 20 * i, np.uint8) for i in range(12)]
    images = [Image.fromarray(p) for p in pixels]
    images[7] = None
    labels = [i % 3 for i in range(12)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["tee", "bag", "shoe"])}
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    ds.save_to_disk(str(tmp_path / "train"), num_shards=3)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    return tmp_path, pixels, labels


def test_a_saved_dataset_lists_and_reads_row_for_row(saved):
    root, pixels, labels = saved
    uri = str(root / "train")
    assert source_kind(uri) == "hf_disk"
    listing = list_source(uri, model_names=None, num_model_classes=None, shard_size=3)
    assert listing.names == {0: "tee", 1: "bag", 2: "shoe"} and listing.counts == {0: 4, 1: 4, 2: 4}
    assert sum(s.inputs for s in listing.shards) == 12 and listing.native_size == 5
    rows = rows_of(listing)
    assert [r["label"] for r in rows] == labels
    assert len({r["key"] for r in rows}) == 12 and rows[0]["key"] == "data-00000-of-00003.arrow:0"
    assert rows[7]["reason"] == "no image data (null)"
    for i, r in enumerate(rows):
        if i != 7:
            np.testing.assert_array_equal(to_pixels(r["item"], 5), to_pixels(pixels[i], 5))
    # Narrow reads: labels and keys alone, and a few keys.
    keys = [r for s in listing.shards for r in read_shard(s.keys_pass())]
    assert [(r["label"], r["key"], r["item"]) for r in keys] == [(r["label"], r["key"], None) for r in rows]
    pick = [rows[1]["key"], rows[10]["key"]]
    assert [r["key"] for s in listing.shards for r in read_shard(s.narrowed([k for k in pick]))] == pick


def test_a_model_maps_the_classes_by_name_and_a_dict_names_its_splits(saved):
    root, _, _ = saved
    listing = list_source(str(root / "train"), model_names=["shoe", "tee", "bag"], num_model_classes=3, classes=["bag"])
    assert listing.names == {2: "bag"} and [r["label"] for r in rows_of(listing)] == [2] * 4
    with pytest.raises(ValueError, match="DatasetDict.*train"):
        list_source(str(root / "dict"), model_names=None, num_model_classes=None)
    assert sum(list_source(str(root / "dict" / "test"), model_names=None, num_model_classes=None).counts.values()) == 12
