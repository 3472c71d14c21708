"""Ray Datasets over the data layer's shards (`d3hr_ray.data.sources`): one read task per shard.

descriptor_dataset(shards)  {shard: JSON}, one block per shard, so each is read by its own task
rows_dataset(shards)        every row {item, label, key, reason, shard (its id)}
keys_dataset(shards)        every row's {label, key, shard}, no image read
open_listing(listing)       `Source`: a listing and its rows_dataset (finetune, evaluate)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray

from d3hr_ray.data.listing import Listing, Shard
from d3hr_ray.data.sources import read_shard, shard_from_json

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["Source", "descriptor_dataset", "keys_dataset", "open_listing", "rows_dataset"]


@dataclass(frozen=True)
class Source:
    """A readable data set: its listing, and a Ray Dataset of its rows
    {item, label: int64, key: str, reason: str, shard: int64}."""

    listing: Listing
    dataset: Dataset

    @property
    def names(self) -> dict[int, str]:
        return self.listing.names

    @property
    def native_size(self) -> int | None:
        return self.listing.native_size


def descriptor_dataset(shards: list[Shard]) -> ray.data.Dataset:
    """A Ray Dataset of shard records {shard: JSON}, one block each (so each is read by its own task)."""
    return ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=max(1, len(shards)))


def _read_shards_batch(batch: dict) -> dict:
    """Ray Data task: shard records (JSON) -> their rows, each with its shard id."""
    rows = [(r, s.id) for s in map(shard_from_json, batch["shard"]) for r in read_shard(s)]
    items = np.empty(len(rows), dtype=object)
    items[:] = [r["item"] for r, _ in rows]
    return {
        "item": items,
        "label": np.array([r["label"] for r, _ in rows], dtype=np.int64),
        "key": np.array([r["key"] for r, _ in rows], dtype=object),
        "reason": np.array([r["reason"] for r, _ in rows], dtype=object),
        "shard": np.array([i for _, i in rows], dtype=np.int64),
    }


def rows_dataset(shards: list[Shard]) -> ray.data.Dataset:
    """A Ray Dataset reading `shards` (one read task per shard): rows {item, label, key, reason, shard (its id)}."""
    return descriptor_dataset(shards).map_batches(_read_shards_batch, batch_size=1, batch_format="numpy")


def _read_keys_batch(batch: dict) -> dict:
    """Ray Data task: shard records (JSON) -> {label, key, shard id} of their rows; no image is read."""
    rows = [
        (r["label"], r["key"], s.id) for s in map(shard_from_json, batch["shard"]) for r in read_shard(s.keys_pass())
    ]
    return {
        "label": np.array([r[0] for r in rows], dtype=np.int64),
        "key": np.array([r[1] for r in rows], dtype=object),
        "shard": np.array([r[2] for r in rows], dtype=np.int64),
    }


def keys_dataset(shards: list[Shard]) -> ray.data.Dataset:
    """A Ray Dataset of every row's {label, key, shard} (one task per shard), reading no image."""
    return descriptor_dataset(shards).map_batches(_read_keys_batch, batch_size=1, batch_format="numpy")


def open_listing(listing: Listing) -> Source:
    """A listing (`data.sources.list_source`) and a Ray Dataset of its rows (every listed input, refused ones with
    a reason), as one `Source`."""
    return Source(listing, rows_dataset(listing.shards))
