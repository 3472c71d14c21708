"""Images for classifier training and testing as uint8 rows, and the random-real baseline's selection.

Pure numpy/pyarrow; the Ray Datasets are built by the jobs (train_teacher, evaluate).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pyarrow import fs as pafs

from d3hr_ray.data.preprocess import convert_batch, to_pixels
from d3hr_ray.data.subset import lowest_ranked
from d3hr_ray.storage.fs import resolve
from d3hr_ray.storage.s3 import explained

__all__ = ["classifier_rows", "distilled_location", "random_real_keys"]


def classifier_rows(batch: dict[str, np.ndarray], *, resolution: int) -> dict[str, np.ndarray]:
    """{item, label, key} -> {image (N, 3, R, R) uint8, label (N,) int64, ok (N,) bool, reason}.

    Images are resized (shorter side) and centre-cropped to R; a refused row keeps its place with
    ok False and the reason, so that the job counts it.
    """
    labels = np.asarray(batch["label"], dtype=np.int64)
    images, reasons = convert_batch(
        batch["item"], labels, lambda it: to_pixels(it, resolution), (3, resolution, resolution), np.uint8
    )
    return {"image": images, "label": labels, "ok": reasons == "", "reason": reasons}


def random_real_keys(batches: Iterable[dict], ipc: int, seed: int) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """The random-real baseline's K = ipc images per class: `data.subset.lowest_ranked` with purpose "random-real".

    Returns (chosen key -> (class id, its shard id from the stream, -1 without one); class id -> how many
    were available when fewer than K).
    """
    return lowest_ranked(batches, ipc, seed, "random-real")


def distilled_location(uri: str) -> str:
    """A distill output folder (it has manifest.json) -> its distilled.parquet; anything else unchanged."""
    with explained(uri):
        fs, path = resolve(uri)
        found = fs.get_file_info(path.rstrip("/") + "/manifest.json").type == pafs.FileType.File
    return uri.rstrip("/") + "/distilled.parquet" if found else uri
