"""scikit-learn's 8x8 digits (they ship inside the wheel): the embedded default data set, as a source.

`digits` is all 1,797 images; `digits:train` (3 of every 4) and `digits:test` (every 4th, i % 4 == 3)
are a fixed split by position for classifier training and testing (1,348 and 449 images). Keys are
`digits/<index>`; shards are runs of the split's indices.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from d3hr_ray.data.listing import Listing, ListRequest, Shard, map_classes, runs, select_classes

__all__ = ["DIGITS_SPLITS", "DigitsShard", "digits_rgb", "digits_split", "list_digits", "read_digits"]

DIGITS_SPLITS = ("digits", "digits:train", "digits:test")


@dataclass(frozen=True, kw_only=True)
class DigitsShard(Shard):
    """Positions [start, stop) among the split's images of the classes this run reads."""

    kind: ClassVar[str] = "digits"
    ids: dict[str, int]  # digit name ("0".."9") -> the model's class id
    classes: tuple[int, ...]  # the model class ids this run reads


@functools.cache
def digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as images: (N, 8, 8, 3) uint8 RGB (grey levels 0..16 scaled to 0..255), (N,) int64 labels.

    Parsed once a process (scikit-learn reads its CSV in about 0.1 s; a listing and every shard read ask for it) and
    returned read-only, since every caller shares the arrays.
    """
    from sklearn.datasets import load_digits  # here, not at the top: 2.5 s to import, paid only where digits are read

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    rgb, target = np.repeat(pixels[..., None], 3, axis=-1), d.target.astype(np.int64)
    rgb.flags.writeable = target.flags.writeable = False
    return rgb, target


def digits_split(n: int, uri: str) -> np.ndarray:
    """(n,) bool: the images of 'digits' (all), 'digits:train' (3 of every 4) or 'digits:test' (every 4th)."""
    if uri not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {uri!r}; use one of {', '.join(DIGITS_SPLITS)}")
    test = np.arange(n) % 4 == 3
    return {"digits": np.ones(n, dtype=bool), "digits:train": ~test, "digits:test": test}[uri]


def _rows(uri: str, target: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """Indices of the digits this run reads, in order."""
    keep = np.isin(target, [int(n) for n in names.values()]) & digits_split(len(target), uri)
    return np.flatnonzero(keep)


def list_digits(uri: str, ask: ListRequest) -> Listing:
    rgb, target = digits_rgb()  # (N, 8, 8, 3), (N,)
    ids = map_classes([str(i) for i in range(10)], ask.model_names, ask.num_model_classes, ask.class_map)
    names = select_classes(ids, ask.classes)
    rows = _rows(uri, target, names)
    counts = {cid: int(np.sum(target[rows] == int(name))) for cid, name in names.items()}
    shards: list[Shard] = [
        DigitsShard(id=i, uri=uri, start=s, stop=e, ids=ids, classes=tuple(sorted(names)))
        for i, (s, e) in enumerate(runs(len(rows), ask.shard_size))
    ]
    return Listing("digits", uri, names, counts, shards, int(rgb.shape[1]))


def read_digits(shard: DigitsShard) -> Iterator[dict]:
    """The shard's rows {item: (8, 8, 3) uint8, label, key, reason}."""
    rgb, target = digits_rgb()
    names = {cid: name for name, cid in shard.ids.items() if cid in set(shard.classes)}
    only = None if shard.only is None else set(shard.only)
    for i in _rows(shard.uri, target, names)[shard.start : shard.stop]:
        if only is not None and f"digits/{i}" not in only:
            continue
        yield {"item": rgb[i], "label": shard.ids[str(int(target[i]))], "key": f"digits/{i}", "reason": ""}
