"""Statistics state: what persisting and merging the per-shard partial statistics costs, on synthetic latents.

Drives the product's own persist-and-merge code (artifacts/blocks.py's BlockWriter and merge_blocks,
artifacts/state.py's RunState on a local OutputDir, stages/stats.py's ClassStats) with latents drawn from a
seeded normal distribution instead of a model, for a data set of a --shape's images and classes cut into
shards, in two orders:

    sorted    labels in class order (ImageFolder): a shard holds one or two classes
    shuffled  labels drawn uniformly per image (WebDataset, Hugging Face Parquet): a shard holds most classes

and two layouts: `blocks` (the product's: shards folded into blocks of `blocks.block_size` consecutive shards)
and `shards` (blocks of one shard: byte for byte the file a shard the product wrote before issue #29).

Reports, per order and layout: bytes written to `_state/`, the peak bytes on disk there, the driver's seconds
folding shards into blocks while the run computes (the persisting), the seconds of the driver's final merge
(reading the state back and merging it into one ClassStats), how far the process's resident memory grew during
that merge (its peak over its size at the start), and the most bytes the BlockWriter held at once. The shapes of
the issue are presets (--shape); D may be made smaller with --dim to keep a run on this machine (bytes and
seconds grow linearly in D: the rows say what they extrapolate to).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from d3hr_ray.artifacts.blocks import Blocks, BlockWriter, block_size, merge_blocks
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.stages.stats import ClassStats, batch_partial
from d3hr_ray.storage.fs import OutputDir

# name -> (images, classes, shard size, D)
SHAPES = {
    "tiny": (2_000, 100, 50, 256),  # the issue's tiny shuffled run: 40 shards of 50, digits' D
    "imagenet1k": (1_281_167, 1_000, 1_024, 4_096),  # DiT-XL/2 at 256 px: D = 4 x 32 x 32
    "imagenet21k": (14_197_122, 21_841, 1_024, 4_096),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="data set shape (default: tiny)")
    p.add_argument("--dim", type=int, default=None, help="latent dimension D (default: the shape's)")
    p.add_argument("--order", choices=["sorted", "shuffled", "both"], default="both")
    p.add_argument(
        "--layout",
        choices=["blocks", "shards", "both"],
        default="both",
        help="blocks: the product's; shards: a file a shard, as before issue #29 (default: both)",
    )
    p.add_argument("--root", default=None, help="folder for the state (default: a temporary folder)")


class _Counting(OutputDir):
    """An OutputDir that counts what is written and removed: bytes written, bytes on disk now and at peak."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.sizes: dict[str, int] = {}
        self.written = 0
        self.peak = 0

    def write_bytes(self, rel: str, data: bytes) -> str:
        out = super().write_bytes(rel, data)
        self.sizes[rel] = len(data)
        self.written += len(data)
        self.peak = max(self.peak, sum(self.sizes.values()))
        return out

    def remove(self, rel: str) -> None:
        super().remove(rel)
        for k in [k for k in self.sizes if k == rel or k.startswith(rel.rstrip("/") + "/")]:
            del self.sizes[k]


class _PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every 5 ms from /proc), and at its start."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shard_batches(images: int, classes: int, shard_size: int, dim: int, order: str):
    """(shard id, latents (n, D) float32, labels (n,) int64) of every shard, seeded by shard id."""
    for sid, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        g = torch.Generator().manual_seed(sid)
        if order == "sorted":
            labels = (torch.arange(start, start + n) * classes // images).to(torch.int64)
        else:
            labels = torch.randint(0, classes, (n,), generator=g)
        yield sid, torch.randn(n, dim, generator=g), labels


def persist(
    state: RunState, blocks: Blocks, images: int, classes: int, shard_size: int, dim: int, order: str
) -> tuple[float, int]:
    """Every shard's partial statistics handed to a BlockWriter as the statistics stage does (in shard order, as a
    steady pipeline delivers them). Returns (seconds in the persisting code, the synthetic latents' generation
    excluded; the most bytes the writer held at once)."""
    writer = BlockWriter(blocks, dim, state.write_block)
    spent = 0.0
    for sid, x, y in shard_batches(images, classes, shard_size, dim, order):
        partial = batch_partial(x, y, classes)  # what a model actor computes for its batch
        read = {int(c): int(k) for c, k in zip(partial["classes"], partial["count"], strict=True)}
        t = time.perf_counter()
        writer.add(sid, partial, read, [])
        spent += time.perf_counter() - t
    writer.close()
    return spent, writer.peak_bytes


def merge(state: RunState, blocks: Blocks, classes: int, dim: int) -> ClassStats:
    """The driver's final merge: every block read back in id order and merged (steps/estimate.py)."""
    stats, read = ClassStats(classes, dim), torch.zeros(classes, dtype=torch.int64).numpy()
    merge_blocks(state.iter_blocks(list(range(len(blocks)))), stats, read, [])
    return stats


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    images, classes, shard_size, dim0 = SHAPES[args.shape]
    dim = args.dim or dim0
    scale = dim0 / dim
    orders = ["sorted", "shuffled"] if args.order == "both" else [args.order]
    layouts = ["shards", "blocks"] if args.layout == "both" else [args.layout]
    n_shards = -(-images // shard_size)
    print(
        f"state benchmark: {args.shape}: {images:,} images, {classes:,} classes, {n_shards:,} shards of "
        f"{shard_size:,}, D = {dim}"
        + (f" (the shape's D is {dim0}: bytes and seconds x {scale:g} extrapolate to it)" if scale != 1 else "")
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(
        "| order | layout | files | written | peak on disk | fold s | merge s | merge RSS growth | writer held | "
        "final stats (C x D x 16) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for order in orders:
        for layout in layouts:
            size = 1 if layout == "shards" else block_size(n_shards, images, classes)
            blocks = Blocks(tuple(range(n_shards)), size)
            with tempfile.TemporaryDirectory(dir=args.root) as tmp:
                out = _Counting(str(Path(tmp) / "out"))
                state = RunState(out)
                fold_s, held = persist(state, blocks, images, classes, shard_size, dim, order)
                t = time.perf_counter()
                with _PeakRSS() as rss:
                    stats = merge(state, blocks, classes, dim)
                merge_s = time.perf_counter() - t
                assert int(stats.n.sum()) == images, "the merge lost or double-counted images"
                print(
                    f"| {order} | {layout} ({size} a block) | {len(blocks):,} | {_gb(out.written)} | {_gb(out.peak)} | "
                    f"{fold_s:.1f} | {merge_s:.1f} | {_gb(rss.peak - rss.start)} | {_gb(held)} | "
                    f"{_gb(classes * dim * 16)} |",
                    flush=True,
                )
    return 0
