"""Seeded per-class subsets of a data set's keys, chosen from a stream of labels and keys (no image read).

Each key gets a rank `derive_seed(seed, purpose, key)`, uniform over 63 bits; a class keeps its K lowest
ranks (a tie, probability about n^2 / 2^64, is broken by the key). That is a uniform random K-subset of
the class, the same whatever the order or batching of the stream (so whatever the shards or workers),
kept in O(classes x K) memory. The purpose names the stream: "random-real" for evaluate's baseline,
"stats-subset" for `distill --stats-per-class`; the two never draw the same subset by accident.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np

from d3hr_ray.seeding import derive_seed

__all__ = ["lowest_ranked"]


def lowest_ranked(
    batches: Iterable[dict], per_class: int, seed: int, purpose: str
) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """K = per_class keys of each class, uniformly at random (seeded, purpose-keyed), from {label, key[, shard]}.

    Rows with a negative label (inputs of no class) are never chosen.
    Returns:
        (chosen key -> (class id, shard id from the stream, -1 without one),
         class id -> how many the class had when fewer than K).
    """
    heaps: dict[int, list] = {}
    for b in batches:
        shards = np.asarray(b["shard"]) if "shard" in b else np.full(len(b["key"]), -1)
        for label, key, shard in zip(np.asarray(b["label"]), b["key"], shards, strict=True):
            label = int(label)
            if label < 0:
                continue
            h = heaps.setdefault(label, [])
            item = (
                -derive_seed(seed, purpose, str(key)),
                str(key),
                int(shard),
            )  # a min-heap: h[0] holds the highest rank kept
            if len(h) < per_class:
                heapq.heappush(h, item)
            elif item > h[0]:
                heapq.heapreplace(h, item)
    keys = {k: (c, shard) for c, h in heaps.items() for _, k, shard in h}
    short = {c: len(h) for c, h in heaps.items() if len(h) < per_class}
    return keys, short
