"""D3HR stages 1-3 on Ray: the partial statistics of every shard of an unfinished block, folded into its block
in shard id order and persisted as each block completes (artifacts/blocks.py), then every block's merged in id
order on the driver (O(classes x D) memory), and written.

    shard records -> read_batches (CPU tasks: decode, one row per fixed sub-batch)
                  -> EncodeInvertStats (model actors: encode, invert, sparse partial statistics)
                  -> regrouped per shard (`complete_groups`) (+ _state/latents/<id>)
                  -> BlockWriter -> _state/blocks/<block id>
    every block's file, in id order -> ClassStats -> `Moments` -> stats.safetensors

`estimate_statistics` is the job's step (the above, then the report's counts and skips); `read_statistics` takes the
step's place with --from-stats.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from d3hr_ray.artifacts.blocks import Blocks, BlockWriter, merge_blocks
from d3hr_ray.artifacts.outputs import Moments, StatsMeta, write_stats
from d3hr_ray.artifacts.report import Progress, Resumed, RunReport, Timings
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.config import DistillConfig
from d3hr_ray.data.listing import Listing, Shard, select_classes
from d3hr_ray.data.sources import read_batches
from d3hr_ray.errors import JobError
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.stats import ClassStats, merge_partials
from d3hr_ray.steps.job import Job
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.workers.actors import EncodeInvertStats, EncodeSpec, unpack_partial
from d3hr_ray.workers.datasets import descriptor_dataset
from d3hr_ray.workers.regroup import complete_groups
from d3hr_ray.workers.resources import READ_CPUS, Resources, on_model_actors, stats_actors

__all__ = ["Estimated", "compute_statistics", "estimate_statistics", "read_statistics", "write_statistics"]


@dataclass
class Estimated:
    """What stages 1-3 return: the statistics merged over every block, before they are finalised.

    Attributes:
        stats: the merged ClassStats (float64 count, mean, M2 per class).
        read: (C,) int64 inputs read per class (usable or not).
        skipped: [[location, class id or -1, reason], ...] for every refused input.
        shards: how many shards were reused from an earlier run (those of the blocks it finished).
    """

    stats: ClassStats
    read: np.ndarray
    skipped: list[list]
    shards: Resumed
    timings: Timings


def compute_statistics(job: Job, listing: Listing, resources: Resources, state: RunState) -> Estimated:
    """Stages 1-3 for every shard of `listing` in a block without a finished state file, then all blocks merged.

    Args:
        state: the run's RunState (begun: its `block` is the run's block size).
    """
    cfg, spec = job.cfg, job.info.spec
    timings = Timings()
    blocks = Blocks(tuple(sorted(s.id for s in listing.shards)), state.block)
    done = state.finished_blocks()
    if cfg.keep_latents:  # a block finished by a run without --keep-latents is computed again, for its latents
        kept = state.finished_latents()
        done = {b for b in done if all(s in kept for s in blocks.shards(b))}
    todo = [s for s in listing.shards if blocks.of(s.id) not in done]
    t = time.perf_counter()
    images = _compute(job, resources, todo, state, blocks) if todo else 0
    timings.add("encode+invert+stats", images, time.perf_counter() - t)
    t = time.perf_counter()
    names = [listing.names.get(i, str(i)) for i in range(spec.num_classes)]
    stats = ClassStats(spec.num_classes, spec.latent_dim, class_names=names)
    read = np.zeros(spec.num_classes, dtype=np.int64)
    skipped: list[list] = [[loc, -1, why] for loc, why in listing.skipped]
    missing = sorted(set(range(len(blocks))) - state.finished_blocks())
    if missing:
        raise JobError(
            f"{len(missing)} statistics block(s) are missing after the run (first: block {missing[0]}, shards "
            f"{blocks.shards(missing[0])[0]}-{blocks.shards(missing[0])[-1]}); rerun the same command to compute them"
        )
    merge_blocks(state.iter_blocks(list(range(len(blocks)))), stats, read, skipped)
    timings.add("merge blocks", len(blocks), time.perf_counter() - t)
    n = len(listing.shards)
    return Estimated(stats, read, skipped, Resumed(n, n - len(todo)), timings)


def _compute(job: Job, resources: Resources, todo: list[Shard], state: RunState, blocks: Blocks) -> int:
    """The Ray pipeline over the shards of the unfinished blocks; a shard is folded into its block as soon as its
    last sub-batch arrives (its latents written then, with --keep-latents), and a block's file is written as soon
    as its last shard is folded in. Returns the images encoded and inverted."""
    cfg, spec = job.cfg, job.info.spec
    ds = (
        descriptor_dataset(todo)
        .map_batches(
            read_batches,  # type: ignore[arg-type]  # Ray's UDF type is a union of batch formats
            fn_kwargs={"resolution": spec.resolution, "batch_size": resources.batch_size},
            batch_size=1,
            num_cpus=READ_CPUS,
            batch_format="numpy",
        )
        .repartition(target_num_rows_per_block=1)
    )  # a block per sub-batch: any actor takes any sub-batch
    enc = EncodeSpec(
        model=job.model,
        device=resources.device,
        dtype=resources.dtype,
        mode=cfg.encode,
        seed=cfg.seed,
        steps=cfg.steps,
        inversion_step=cfg.inversion_step,
        guidance=cfg.guidance,
        threads=resources.actor_threads,
        chunk=cfg.batch_size is None,
        compile=False,  # `on_model_actors` decides
        keep_latents=cfg.keep_latents,
    )
    ds = on_model_actors(
        ds,
        EncodeInvertStats,
        enc,
        resources,
        stats_actors(todo, resources.batch_size, resources.actors),
        compile_mode=cfg.compile,
        images=sum(s.inputs for s in todo),
        log="encode+invert: ",
    )
    total = len(blocks.shard_ids)
    progress = Progress("statistics", "shards", total, total - len(todo))
    writer = BlockWriter(blocks, spec.latent_dim, state.write_block)

    def parts() -> Iterator[tuple[int, int, int, tuple]]:
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


def write_statistics(out: OutputDir, result: Estimated, classes: list[int], meta: StatsMeta) -> Moments:
    """Finalise the classes being distilled and write stats.safetensors (every class's counts, whatever happens next).

    Args:
        classes: the class ids this run distils; meta: the file's metadata (model, steps, names, ...).
    """
    mean_t, var_t, short = result.stats.finalise(sorted(classes))
    final = Moments(mean_t.numpy(), var_t.numpy(), result.stats.count.numpy(), list(short))
    write_stats(out, final.mean, final.var, final.count, meta)
    return final


def estimate_statistics(job: Job, resources: Resources, out: OutputDir, state: RunState, report: RunReport) -> Moments:
    """The job's statistics step: stages 1-3 and stats.safetensors; the report gets per-class counts, skips and the
    classes that cannot be distilled (a JobError with --strict)."""
    cfg, spec, names = job.cfg, job.info.spec, job.names
    if job.data is None:  # open_job lists --data for every run that computes statistics
        raise TypeError("the statistics step needs the listing of --data")
    result = compute_statistics(job, job.data, resources, state)
    report.shards = result.shards
    report.timings.merge(result.timings)
    t = time.perf_counter()
    meta = StatsMeta(
        model=cfg.model,
        steps=cfg.steps,
        inversion_step=cfg.inversion_step,
        timestep=job.timestep,
        guidance=cfg.guidance,
        encode=cfg.encode,
        seed=cfg.seed,
        data=cfg.data,
        class_names=[
            names.get(i, job.info.class_names[i] if job.info.class_names else str(i)) for i in range(spec.num_classes)
        ],
        native_size=job.native or spec.resolution,
    )
    stats = write_statistics(out, result, list(names), meta)
    report.timings.add("write stats", 1, time.perf_counter() - t)
    report.counts = {
        name: {
            "read": int(result.read[c]),
            "used": int(stats.count[c]),
            "skipped": int(result.read[c] - stats.count[c]),
        }
        for c, name in names.items()
    }
    report.skipped = [
        {"input": loc, "class": (names.get(y) if y >= 0 else None), "reason": r} for loc, y, r in result.skipped
    ]
    if stats.short:
        report.undistilled = {
            names[c]: f"{int(stats.count[c])} usable image(s); at least 2 are needed for a variance"
            for c in stats.short
        }
        report.reasons.append(
            f"{len(stats.short)} class(es) cannot be distilled (fewer than 2 usable images): "
            + ", ".join(repr(names[c]) for c in stats.short[:10])
            + (" ..." if len(stats.short) > 10 else "")
        )
        if cfg.strict:
            raise JobError(f"--strict: {report.reasons[-1]}")
    return stats


def read_statistics(
    cfg: DistillConfig, spec: ModelSpec, meta: StatsMeta, tensors: dict[str, np.ndarray], timestep: int
) -> tuple[Moments, dict[int, str], int | None]:
    """--from-stats in place of stages 1-3: (the file's Moments, the classes to distil, the images' native size),
    checked against the model and the flags (a JobError names the mismatch)."""
    mean, var, n = tensors["mean"], tensors["var"], tensors["count"]
    if mean.shape != (spec.num_classes, spec.latent_dim):
        raise JobError(
            f"--from-stats: statistics are {mean.shape} but the model needs ({spec.num_classes}, {spec.latent_dim})"
        )
    if meta.timestep and meta.timestep != timestep:
        raise JobError(
            f"--from-stats: statistics are at timestep {meta.timestep} but --steps/--inversion-step give {timestep}"
        )
    all_names = meta.class_names or [str(i) for i in range(spec.num_classes)]
    have = {all_names[i]: i for i in range(spec.num_classes) if n[i] >= 2}
    try:
        names = select_classes(have, cfg.classes)
    except ValueError:
        missing = [c for c in cfg.classes or () if c not in have and not (c.isdigit() and int(c) in have.values())]
        raise JobError(f"--classes: {missing[0]!r} has no statistics in {cfg.from_stats}") from None
    return Moments(mean, var, n, []), names, meta.native_size
