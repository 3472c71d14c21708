"""artifacts/distilled.py: a distilled set read back by Ray Data and by Hugging Face datasets."""

import numpy as np
from PIL import Image

from tests.cifar_slice import CLASSES, needs_cifar


@needs_cifar
def test_distilled_set_loads_without_glue(first_run):
    """Ray Data (read_distilled, for a downstream Ray Train job) and Hugging Face datasets read distilled.parquet."""
    import datasets

    from d3hr_ray.artifacts.distilled import read_distilled

    _, out = first_run
    ds, names = read_distilled(str(out))
    assert names == CLASSES
    rows = sorted(ds.take_all(), key=lambda r: (int(r["label"]), r["image"].tobytes()))
    expected = sorted(
        (
            (c, np.asarray(Image.open(p).convert("RGB")))
            for c, name in enumerate(CLASSES)
            for p in (out / "images" / name).glob("*.png")
        ),
        key=lambda x: (x[0], x[1].tobytes()),
    )
    assert len(rows) == len(expected) == 12
    for row, (label, pixels) in zip(rows, expected, strict=True):
        assert int(row["label"]) == label and row["image"].dtype == np.uint8 and np.array_equal(row["image"], pixels)

    hf = datasets.load_dataset("parquet", data_files=str(out / "distilled.parquet"), split="train")
    assert hf.features["label"].names == CLASSES and isinstance(hf.features["image"], datasets.Image)
    first = hf[0]
    assert first["image"].size == (32, 32) and hf.features["label"].int2str(first["label"]) == first["class"]
