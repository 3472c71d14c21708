"""D3HR stages 1-3 on Ray: the partial statistics of every shard of an unfinished block, folded into its block
in shard id order and persisted as each block completes (artifacts/blocks.py), then every block's merged in id
order on the driver (O(classes x D) memory), and written.

    shard records -> read_batches (CPU tasks: decode, one row per fixed sub-batch)
                  -> EncodeInvertStats (model actors: encode, invert, sparse partial statistics)
                  -> regrouped per shard (`complete_groups`) (+ _state/latents/<id>)
                  -> BlockWriter -> _state/blocks/<block id>
    every block's file, in id order -> ClassStats -> stats.safetensors
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from d3hr_ray.artifacts.blocks import Blocks, BlockWriter, merge_blocks
from d3hr_ray.artifacts.report import Progress, Resumed, Timings
from d3hr_ray.errors import JobError

__all__ = ["ClassStatistics", "Statistics", "compute_statistics", "write_statistics"]


@dataclass
class Statistics:
    """What the statistics stage returns.

    Attributes:
        stats: the merged ClassStats (float64 count, mean, M2 per class).
        read: (C,) int64 inputs read per class (usable or not).
        skipped: [[location, class id or -1, reason], ...] for every refused input.
        shards: how many shards were reused from an earlier run (those of the blocks it finished).
    """

    stats: object
    read: np.ndarray
    skipped: list
    shards: Resumed
    timings: Timings


@dataclass(frozen=True)
class ClassStatistics:
    """The finalised statistics: mean, var (C, D) float32 (the values written), count (C,), and the classes
    with fewer than 2 usable inputs (no variance: they cannot be distilled)."""

    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray
    short: list[int]


def compute_statistics(cfg, spec, res, listing, state) -> Statistics:
    """Stages 1-3 for every shard of a block without a finished state file, then all blocks merged.

    Args:
        cfg: the DistillConfig; spec: the model's ModelSpec; res: `resources.Resources`; state: the run's RunState
            (begun: its `block` is the run's block size).
    """
    timings = Timings()
    blocks = Blocks(tuple(sorted(s.id for s in listing.shards)), state.block)
    done = state.finished_blocks()
    if cfg.keep_latents:  # a block finished by a run without --keep-latents is computed again, for its latents
        kept = state.finished_latents()
        done = {b for b in done if all(s in kept for s in blocks.shards(b))}
    todo = [s for s in listing.shards if blocks.of(s.id) not in done]
    t = time.perf_counter()
    images = _compute(cfg, spec, res, todo, state, blocks) if todo else 0
    timings.add("encode+invert+stats", images, time.perf_counter() - t)

    from d3hr_ray.stages.stats import ClassStats

    t = time.perf_counter()
    names = [listing.names.get(i, str(i)) for i in range(spec.num_classes)]
    stats = ClassStats(spec.num_classes, spec.latent_dim, class_names=names)
    read = np.zeros(spec.num_classes, dtype=np.int64)
    skipped = [[loc, -1, why] for loc, why in listing.skipped]
    missing = sorted(set(range(len(blocks))) - state.finished_blocks())
    if missing:
        raise JobError(
            f"{len(missing)} statistics block(s) are missing after the run (first: block {missing[0]}, shards "
            f"{blocks.shards(missing[0])[0]}-{blocks.shards(missing[0])[-1]}); rerun the same command to compute them"
        )
    merge_blocks(state.iter_blocks(list(range(len(blocks)))), stats, read, skipped)
    timings.add("merge blocks", len(blocks), time.perf_counter() - t)
    n = len(listing.shards)
    return Statistics(stats, read, skipped, Resumed(n, n - len(todo)), timings)


def _compute(cfg, spec, res, todo: list, state, blocks: Blocks) -> int:
    """The Ray pipeline over the shards of the unfinished blocks; a shard is folded into its block as soon as its
    last sub-batch arrives (its latents written then, with --keep-latents), and a block's file is written as soon
    as its last shard is folded in. Returns the images encoded and inverted."""
    import torch

    from d3hr_ray.data.sources import read_batches
    from d3hr_ray.stages.stats import merge_partials
    from d3hr_ray.workers.actors import EncodeInvertStats, EncodeSpec, unpack_partial
    from d3hr_ray.workers.datasets import descriptor_dataset
    from d3hr_ray.workers.regroup import complete_groups
    from d3hr_ray.workers.resources import READ_CPUS, actor_pool, stats_actors

    ds = (
        descriptor_dataset(todo)
        .map_batches(
            read_batches,
            fn_kwargs={"resolution": spec.resolution, "batch_size": res.batch_size},
            batch_size=1,
            num_cpus=READ_CPUS,
            batch_format="numpy",
        )
        .repartition(target_num_rows_per_block=1)
    )  # a block per sub-batch: any actor takes any sub-batch
    from d3hr_ray.workers.resources import compile_choice

    actors = stats_actors(todo, res.batch_size, res.actors)
    compiled, why = compile_choice(cfg.compile, res.device, sum(s.inputs for s in todo) / actors)
    print(f"encode+invert: {why}", flush=True)
    enc = EncodeSpec(
        model=cfg.model,
        device=res.device,
        dtype=res.dtype,
        mode=cfg.encode,
        seed=cfg.seed,
        steps=cfg.steps,
        inversion_step=cfg.inversion_step,
        guidance=cfg.guidance,
        threads=res.actor_threads,
        chunk=cfg.batch_size is None,
        compile=compiled,
        keep_latents=cfg.keep_latents,
    )
    ds = ds.map_batches(
        EncodeInvertStats,
        fn_constructor_args=(enc,),
        batch_size=1,
        compute=actor_pool(actors, res.initial_actors),
        num_gpus=res.num_gpus,
        num_cpus=res.actor_cpus,
        resources=res.resources,
        batch_format="numpy",
    )
    total = len(blocks.shard_ids)
    progress = Progress("statistics", "shards", total, total - len(todo))
    writer = BlockWriter(blocks, spec.latent_dim, state.write_block)

    def parts():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            kept = batch["latents"] if cfg.keep_latents else [None] * len(batch["shard"])
            for shard, part, count, blob, text, lat in zip(
                batch["shard"], batch["part"], batch["parts"], batch["partial"], batch["meta"], kept, strict=True
            ):
                meta = json.loads(text)
                if cfg.strict and meta["skipped"]:
                    loc, _, why = meta["skipped"][0]
                    raise JobError(f"--strict: {loc}: {why}")
                yield int(shard), int(part), int(count), (unpack_partial(blob), meta, lat)

    images = 0
    for shard, items in complete_groups(parts()):  # parts in part order: bit-identical on every run
        read: dict[int, int] = {}
        for _, m, _ in items:
            for c, k in m["read"].items():
                read[int(c)] = read.get(int(c), 0) + k
        if cfg.keep_latents:  # before the block's statistics file, which marks the block finished
            z = np.concatenate(
                [np.frombuffer(bytes(b), dtype=np.float16).reshape(-1, spec.latent_dim) for _, _, b in items]
            )
            state.write_latents(
                shard,
                torch.from_numpy(z),
                [y for _, m, _ in items for y in m["labels"]],
                [k for _, m, _ in items for k in m["keys"]],
            )
        writer.add(
            shard,
            merge_partials([p for p, _, _ in items], spec.latent_dim),
            read,
            [s for _, m, _ in items for s in m["skipped"]],
        )
        n = sum(len(m["labels"]) for _, m, _ in items)
        images += n
        progress.step(n)
    writer.close()
    return images


def write_statistics(out, result: Statistics, classes: list[int], metadata: dict) -> ClassStatistics:
    """Finalise the classes being distilled and write stats.safetensors (every class's counts, whatever happens next).

    Args:
        classes: the class ids this run distils; metadata: the file's string metadata (model, steps, names, ...).
    """
    from d3hr_ray.artifacts.outputs import write_stats

    mean_t, var_t, short = result.stats.finalise(sorted(classes))
    final = ClassStatistics(mean_t.numpy(), var_t.numpy(), result.stats.count.numpy(), list(short))
    write_stats(out, final.mean, final.var, final.count, metadata)
    return final
