"""Statistics blocks: the partial statistics of consecutive shards, merged in shard id order and persisted a
block at a time, so that the state a run keeps does not grow with (classes in a shard) x (shards).

A shard's partial statistics hold every class present in it: one or two for class-sorted data (ImageFolder),
most of the classes for shuffled data (WebDataset, the Hugging Face ImageNet Parquet), where a file per shard
would write (shards x classes x D x 16) bytes, 52 GB for ImageNet-1K at D = 4,096. Instead the shards, in id
order, are cut into blocks of `size` consecutive ids (`block_size`, fixed when a run starts and recorded in
`_state/run.json`). The driver folds each finished shard into its block's accumulator in id order (a shard
that finishes early waits in memory for the ones before it) and writes the block's file when its last shard
is folded in; at the end the blocks are merged in id order. Both orders are fixed by the shard ids alone, so
the statistics are bit-identical whatever the workers, their order, kills and resumes. A kill loses the
blocks in progress (at most about 1/MAX_BLOCKS of the run each, recomputed by the rerun), never a block on disk.

    shard partials (any order) -> BlockWriter (fold in id order per block) -> _state/blocks/<block id>
    _state/blocks/* in id order -> merge_blocks -> ClassStats
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from d3hr_ray.stages.stats import ClassStats, PartialAccumulator

__all__ = ["BLOCK_IMAGES_PER_CLASS", "MAX_BLOCKS", "BlockWriter", "Blocks", "block_size", "merge_blocks"]

# At most this many blocks a run: bounds the bytes written for shuffled data to MAX_BLOCKS x C x D x 16
# (2.6 GB for ImageNet-1K at D = 4,096), and a kill's loss to about 1/MAX_BLOCKS of the run.
MAX_BLOCKS = 40
# A block holds at least this many images per class on average: with fewer, a shuffled block would hold
# nearly one row per image and merging shards into it would save little (4 an average class covers 98 %).
BLOCK_IMAGES_PER_CLASS = 4


def block_size(shards: int, inputs: int, classes: int) -> int:
    """Shards a block holds, from the listing's counts: enough that there are at most MAX_BLOCKS blocks and a
    block averages BLOCK_IMAGES_PER_CLASS images a class; at least 1, at most `shards`.

    Args:
        shards: shards in the listing; inputs: images in it; classes: classes it distils.
    """
    if shards < 1:
        return 1
    per_shard = max(1.0, inputs / shards)
    size = max(math.ceil(shards / MAX_BLOCKS), math.ceil(BLOCK_IMAGES_PER_CLASS * classes / per_shard))
    return max(1, min(shards, size))


@dataclass(frozen=True)
class Blocks:
    """The listing's shard ids, sorted, cut into blocks of `size` consecutive ids (the last may be shorter).

    Attributes:
        shard_ids: every shard id of the listing, sorted.
        size: shards a block (`block_size`).
    """

    shard_ids: tuple[int, ...]
    size: int
    _block_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a block holds at least one shard, got size {self.size}")
        if list(self.shard_ids) != sorted(set(self.shard_ids)):
            raise ValueError("shard ids must be sorted and unique")
        object.__setattr__(self, "_block_of", {s: i // self.size for i, s in enumerate(self.shard_ids)})

    def __len__(self) -> int:
        return math.ceil(len(self.shard_ids) / self.size)

    def of(self, shard_id: int) -> int:
        """The block a shard belongs to."""
        return self._block_of[shard_id]

    def shards(self, block: int) -> tuple[int, ...]:
        """The shard ids of a block, in order."""
        return self.shard_ids[block * self.size : (block + 1) * self.size]


@dataclass
class _Open:
    """A block being filled: its shard ids, how many are folded in, the accumulator and what waits."""

    ids: tuple[int, ...]
    folded: int = 0
    acc: PartialAccumulator | None = None
    read: dict[int, int] = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    waiting: dict[int, tuple] = field(default_factory=dict)  # shard id -> (partial, read, skipped)
    shard_classes: dict[int, list[int]] = field(default_factory=dict)  # shard id -> the class ids it holds


Write = Callable[[int, dict[str, torch.Tensor], dict[int, int], list, dict[int, list[int]]], None]


class BlockWriter:
    """Folds finished shards into their blocks in shard id order, whatever order they arrive in, and writes a
    block (through `write`) as soon as its last shard is folded in.

    Memory: an accumulator per block in progress (O(classes in it x D)) and the partials of shards that
    finished before an earlier shard of their block.

    Args:
        blocks: the run's Blocks.
        dim: D.
        write: write(block id, partial {classes, count, mean, m2}, read {class id: inputs read}, skipped list,
            {shard id: the class ids it holds}) (RunState.write_block).
    """

    def __init__(self, blocks: Blocks, dim: int, write: Write):
        self.blocks, self.dim, self._write = blocks, int(dim), write
        self._open: dict[int, _Open] = {}
        self.peak_bytes = 0  # the most bytes of accumulators and waiting partials held at once

    def add(self, shard_id: int, partial: dict[str, torch.Tensor], read: dict[int, int], skipped: list) -> int | None:
        """One finished shard. Returns the block id written by this call, or None.

        Raises:
            ValueError: a shard given twice, or not in the listing.
        """
        block = self.blocks.of(shard_id)
        ob = self._open.setdefault(block, _Open(self.blocks.shards(block)))
        if shard_id in ob.waiting or shard_id in ob.ids[: ob.folded]:
            raise ValueError(f"shard {shard_id} was given twice")
        ob.waiting[shard_id] = (partial, read, skipped)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        while ob.folded < len(ob.ids) and ob.ids[ob.folded] in ob.waiting:
            sid = ob.ids[ob.folded]
            part, r, s = ob.waiting.pop(sid)
            ob.acc = (ob.acc or PartialAccumulator(self.dim)).add(part)
            ob.shard_classes[sid] = part["classes"].tolist()
            for c, k in r.items():
                ob.read[int(c)] = ob.read.get(int(c), 0) + int(k)
            ob.skipped.extend(s)
            ob.folded += 1
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        if ob.folded < len(ob.ids):
            return None
        acc = ob.acc or PartialAccumulator(self.dim)  # a block of shards without inputs holds no class
        self._write(block, acc.to_partial(), dict(sorted(ob.read.items())), ob.skipped, ob.shard_classes)
        del self._open[block]
        return block

    @property
    def held_bytes(self) -> int:
        """Bytes of the accumulators and waiting partials held now."""
        held = 0
        for ob in self._open.values():
            held += ob.acc.nbytes if ob.acc is not None else 0
            held += sum(t.numel() * t.element_size() for p, _, _ in ob.waiting.values() for t in p.values())
        return held

    def close(self) -> None:
        """Check that every block given a shard was written.

        Raises:
            ValueError: naming the first block left incomplete and how many of its shards arrived.
        """
        if self._open:
            b = min(self._open)
            ob = self._open[b]
            raise ValueError(
                f"{len(self._open)} statistics block(s) incomplete (first: block {b}, "
                f"{ob.folded + len(ob.waiting)} of {len(ob.ids)} shards)"
            )


def merge_blocks(
    blocks: Iterable[tuple[int, tuple[dict[str, torch.Tensor], dict[int, int], list]]],
    stats: ClassStats,
    read: np.ndarray,
    skipped: list,
) -> int:
    """Merge (block id, (partial, read, skipped)) in the order given (block id order) into `stats`, `read` (C,)
    and `skipped`, in place. Returns the blocks merged."""
    n = 0
    for _, (partial, block_read, block_skipped) in blocks:
        stats.merge_partial(partial)
        for c, k in block_read.items():
            read[int(c)] += k
        skipped.extend(block_skipped)
        n += 1
    return n
