"""The distill job's first step: its inputs resolved and checked before Ray starts, every problem a JobError.

--model (or the statistics file's, or the bundled digits model) -> ModelInfo (configs, no weights)
--data listed for the model's classes (or --plan-images counted, or --from-stats read)  -> `Job`
"""

from __future__ import annotations

import dataclasses

import numpy as np

from d3hr_ray.artifacts.outputs import read_stats
from d3hr_ray.config import DistillConfig
from d3hr_ray.data.listing import Listing
from d3hr_ray.data.sources import list_source, per_class_subset, read_class_map, read_label_names, source_kind
from d3hr_ray.errors import JobError
from d3hr_ray.models.info import BUNDLED_SHAPES, ModelInfo, bundled_model_info, model_info
from d3hr_ray.models.sources import ModelSourceError
from d3hr_ray.stages.diffusion import ddim_timesteps
from d3hr_ray.steps.estimate import read_statistics
from d3hr_ray.steps.job import Job
from d3hr_ray.steps.plan import PlannedData, planned_data
from d3hr_ray.storage.s3 import S3Error

__all__ = ["BUILTIN_DIGITS", "list_data", "open_job", "resolve_model"]

# The model of `--data digits` when --model is not given: the one that ships with the package.
BUILTIN_DIGITS = "builtin:digits"


def open_job(cfg: DistillConfig) -> Job:
    """Resolve the model and read the listing (or the statistics file); every problem a JobError, before Ray."""
    tensors: dict[str, np.ndarray] = {}
    stats_meta = None
    if cfg.from_stats:
        try:
            tensors, stats_meta = read_stats(cfg.from_stats)
        except FileNotFoundError as e:
            raise JobError(f"--from-stats: {e}") from None
    model = (
        cfg.model
        or (stats_meta.model if stats_meta else None)
        or (BUILTIN_DIGITS if cfg.data.startswith("digits") else None)
    )
    if model is None:
        raise JobError(
            "--model is required for --data other than digits (a DiTPipeline folder, s3:// prefix or hub id)"
        )
    cfg = dataclasses.replace(cfg, model=model)
    info = resolve_model(cfg, model)
    timestep = ddim_timesteps(info.spec, cfg.steps)[cfg.inversion_step]
    if stats_meta is not None:
        stats, names, native = read_statistics(cfg, info.spec, stats_meta, tensors, timestep)
        return Job(cfg, info, timestep, names, native, stats=stats)
    listing: Listing | PlannedData
    if cfg.plan_images is not None and cfg.plan_classes is not None:  # --dry-run from counts (both: config.py)
        try:
            listing = planned_data(cfg.plan_images, cfg.plan_classes, cfg.shard_size, info.class_names)
        except ValueError as e:
            raise JobError(str(e)) from None
    else:
        listing = list_data(cfg, info)
    return Job(cfg, info, timestep, listing.names, listing.native_size, listing=listing)


def resolve_model(cfg: DistillConfig, model: str) -> ModelInfo:
    """The ModelInfo of `model` (--model, resolved) from its configs. A dry run of a hub model whose shape ships with
    the package (models/info.BUNDLED_SHAPES) plans from the bundled configs when the hub cannot be reached, and
    always with --plan-images (offline, no credentials); a --plan-classes above the model's classes plans a DiT of its
    shape with that many classes."""
    bundled = cfg.dry_run and model in BUNDLED_SHAPES
    if bundled and cfg.plan_images is not None:
        info = bundled_model_info(model)
        print(f"plan: {model} from the configs bundled with d3hr_ray (its shape; no hub, no weights)")
    else:
        try:
            info = model_info(model)
        except (ModelSourceError, ValueError) as e:
            if not bundled:
                raise JobError(str(e)) from None
            info = bundled_model_info(model)
            print(f"plan: {model} unreachable ({str(e).splitlines()[0][:120]}); planning from its bundled configs")
    if cfg.plan_classes is not None and cfg.plan_classes > info.spec.num_classes:
        c = cfg.plan_classes
        print(
            f"plan: {model} has {info.spec.num_classes:,} classes; planning a DiT of its shape with {c:,} "
            "(a model trained on the data's classes: the class embedding grows, a pass's FLOPs do not)"
        )
        spec = dataclasses.replace(info.spec, num_classes=c, null_class=c)
        configs = info.configs or {}
        tcfg = {**configs["transformer"], "num_embeds_ada_norm": c}
        info = dataclasses.replace(info, spec=spec, configs={**configs, "transformer": tcfg})
    return info


def list_data(cfg: DistillConfig, info: ModelInfo) -> Listing:
    """--data listed for the model's classes (narrowed by --stats-per-class); a class that can never have a
    variance is refused."""
    try:
        source_kind(cfg.data)  # fail before starting Ray on a missing input
        listing = list_source(
            cfg.data,
            label_names=read_label_names(cfg.class_names),
            class_map=read_class_map(cfg.class_map),
            model_names=info.class_names,
            num_model_classes=info.spec.num_classes,
            classes=cfg.classes,
            shard_size=cfg.shard_size,
            output=None if cfg.dry_run else cfg.output,  # WebDataset keeps each tar's index in its _state/index
        )
        if cfg.stats_per_class is not None:  # a seeded subset of each class: fewer inputs to encode and invert
            listing = per_class_subset(listing, cfg.stats_per_class, cfg.seed)
    except (FileNotFoundError, ValueError, S3Error) as e:
        raise JobError(str(e)) from None
    except OSError as e:  # any other storage error: one line, no traceback
        raise JobError(f"--data {cfg.data}: cannot list it ({str(e).splitlines()[0][:300]})") from None
    few = [c for c, k in listing.counts.items() if k < 2]
    if few:  # refused before any GPU time is spent: such a class can never have a variance
        shown = ", ".join(f"{listing.names[c]!r} ({listing.counts[c]})" for c in few[:10])
        raise JobError(
            f"classes need at least 2 images each for their statistics; --data lists fewer for {len(few)} "
            f"class(es): {shown}{' ...' if len(few) > 10 else ''}; leave them out with --classes"
        )
    if cfg.strict and listing.skipped:
        raise JobError(f"--strict: {listing.skipped[0][0]}: {listing.skipped[0][1]}")
    return listing
