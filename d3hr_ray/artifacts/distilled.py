"""A distilled set, read back as a Ray Dataset: the hand-off to a downstream Ray Train job (docs/chaining.md).

distill writes `distilled.parquet` in the Hugging Face image layout: columns image (struct of PNG
bytes and a path), label (int64, the model's class id) and class (its name), with the ClassLabel
names in the schema's `huggingface` metadata. So `datasets.load_dataset("parquet", ...)` and
`ray.data.read_parquet` read it as it is; this module adds the decoding and the names.

    >>> from d3hr_ray.artifacts.distilled import read_distilled
    >>> ds, names = read_distilled("s3://bucket/distilled/imagenet1k-ipc10")   # a folder or the .parquet
    >>> ds.schema()            # image: (H, W, 3) uint8, label: int64
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from d3hr_ray.storage.fs import resolve

if TYPE_CHECKING:
    import ray

__all__ = ["class_names", "distilled_parquet", "read_distilled"]


def distilled_parquet(uri: str) -> str:
    """A distill output folder (or the file itself) -> the path of its distilled.parquet."""
    return uri if uri.endswith(".parquet") else uri.rstrip("/") + "/distilled.parquet"


def class_names(uri: str) -> list[str]:
    """The ClassLabel names of a distilled set, in label order (from the schema metadata; no row is read)."""
    fs, path = resolve(distilled_parquet(uri))
    with fs.open_input_file(path) as f:
        meta = pq.read_schema(f).metadata or {}
    if b"huggingface" not in meta:
        raise ValueError(f"{distilled_parquet(uri)}: no 'huggingface' schema metadata; not a distill output")
    return list(json.loads(meta[b"huggingface"])["info"]["features"]["label"]["names"])


def _decode(batch: dict) -> dict:
    """{image: structs of PNG bytes, label, class} -> {image: (B, H, W, 3) uint8, label: (B,) int64}."""
    images = [np.asarray(Image.open(io.BytesIO(x["bytes"])).convert("RGB")) for x in batch["image"]]  # each (H, W, 3)
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def read_distilled(uri: str, decode: bool = True) -> tuple[ray.data.Dataset, list[str]]:
    """A distilled set as a Ray Dataset, and its class names.

    Args:
        uri: a distill --output folder or its distilled.parquet, local or s3://.
        decode: decode the PNGs into uint8 arrays (else the rows are the file's own columns).
    Returns:
        (ray.data.Dataset of {image: (H, W, 3) uint8, label: int64}, [class name of label 0, 1, ...]).
    """
    import ray  # artifacts/ is the layer below Ray: only this hand-off to Ray Train reads a set through it

    names = class_names(uri)
    fs, path = resolve(distilled_parquet(uri))
    ds = ray.data.read_parquet(path, filesystem=fs)
    if decode:
        ds = ds.map_batches(_decode, batch_format="numpy")
    return ds, names
