"""Images for classifier training and testing as uint8 rows, and the random-real baseline's selection.

Pure numpy/pyarrow; the Ray Datasets are built by the jobs (train_teacher, evaluate).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np

from d3hr_ray.data.preprocess import convert_batch, to_pixels
from d3hr_ray.seeding import derive_seed

__all__ = ["classifier_rows", "distilled_location", "random_real_keys"]


def classifier_rows(batch: dict, *, resolution: int) -> dict:
    """{item, label, key} -> {image (N, 3, R, R) uint8, label (N,) int64, ok (N,) bool, reason}.

    Images are resized (shorter side) and centre-cropped to R; a refused row keeps its place with
    ok False and the reason, so that the job counts it.
    """
    labels = np.asarray(batch["label"], dtype=np.int64)
    images, reasons = convert_batch(batch["item"], labels, lambda it: to_pixels(it, resolution), (3, resolution, resolution), np.uint8)
    return {"image": images, "label": labels, "ok": reasons == "", "reason": reasons}


def _rank(seed: int, key: str) -> int:
    """An image's place in the random order of the random-real baseline: a seed named by purpose and key."""
    return derive_seed(seed, "random-real", key)


def random_real_keys(batches: Iterable[dict], ipc: int, seed: int) -> tuple[dict[str, int], dict[int, int]]:
    """K = ipc images per class chosen uniformly at random (seeded), from a stream of {label, key[, shard]} batches.

    Each image's rank is `derive_seed(seed, "random-real", key)`, uniform over 63 bits, and a class keeps
    its K lowest ranks (a tie, probability about n^2 / 2^64, is broken by the key): a uniform random
    K-subset, the same whatever the order or batching of the stream, in O(classes x K) memory.
    Returns (chosen key -> its shard id from the stream, -1 without one; class id -> how many were
    available when fewer than K).
    """
    heaps: dict[int, list] = {}
    for b in batches:
        shards = np.asarray(b["shard"]) if "shard" in b else np.full(len(b["key"]), -1)
        for label, key, shard in zip(np.asarray(b["label"]), b["key"], shards):
            label = int(label)
            if label < 0:
                continue
            h = heaps.setdefault(label, [])
            item = (-_rank(seed, str(key)), str(key), int(shard))  # heapq is a min-heap: h[0] holds the highest rank kept
            if len(h) < ipc:
                heapq.heappush(h, item)
            elif item > h[0]:
                heapq.heapreplace(h, item)
    keys = {k: shard for h in heaps.values() for _, k, shard in h}
    short = {c: len(h) for c, h in heaps.items() if len(h) < ipc}
    return keys, short


def distilled_location(uri: str) -> str:
    """A distill output folder (it has manifest.json) -> its distilled.parquet; anything else unchanged."""
    from pyarrow import fs as pafs

    from d3hr_ray.io.fs import resolve

    fs, path = resolve(uri)
    base = path.rstrip("/")
    if fs.get_file_info(base + "/manifest.json").type == pafs.FileType.File:
        return uri.rstrip("/") + "/distilled.parquet"
    return uri
