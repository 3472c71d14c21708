"""`python -m d3hr_ray.distill`: distil an image data set with D3HR on Ray.

    list -> plan (--dry-run stops here)
         -> statistics: read + preprocess (CPU tasks) -> encode + invert + partial statistics (model actors)
            -> merge partials (the driver: O(classes x D) memory)          steps/estimate.py
         -> generation: per class, select a group + sample + decode (model actors), or D3HR's
            selection among the real images (--candidates-from real)        steps/generation.py, real_candidates.py
         -> outputs and the report (manifest.json in every outcome)         artifacts/outputs.py

Runs unchanged on a laptop (a local Ray instance is started), on a running cluster (RAY_ADDRESS) and
under `ray job submit`. With no flags it distils scikit-learn's digits with the bundled model into
./d3hr-output/. Flags and a YAML --config take the same keys; flags win.

Outputs: stats.safetensors, latents.safetensors, images/<class>/<k>.png, distilled.parquet,
grid.png, manifest.json, README.md (the dataset card), report.html (see docs/distill.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass

from d3hr_ray import tracking
from d3hr_ray.artifacts.report import RunReport, Timings
from d3hr_ray.config import DistillConfig
from d3hr_ray.errors import JobError

__all__ = ["DistillResult", "main", "run"]

_BUILTIN_DIGITS = "builtin:digits"
# What --overwrite removes: every file a run writes, nothing else in the folder. The WebDataset listing's per-tar
# index (_state/index/, keyed by each tar's path, size and mtime) describes the input, not a run: it is kept.
_OUTPUTS = (
    "_state/run.json",
    "_state/blocks",
    "_state/shards",  # written by version 1
    "_state/classes",
    "_state/latents",
    "images",
    "stats.safetensors",
    "latents.safetensors",
    "distilled.parquet",
    "grid.png",
    "manifest.json",
    "report.html",
    "report",  # report.html's other pages and thumbnails
    "README.md",  # the dataset card
    "mlflow.json",  # --overwrite starts a new MLflow run too
)


@dataclass(frozen=True)
class DistillResult:
    """What `run` returns: the plan (--dry-run), or the manifest as written, the output's location and the timings."""

    plan: dict | None = None
    manifest: dict | None = None
    output: str | None = None
    timings: Timings | None = None


@dataclass(frozen=True)
class _Job:
    """The run's inputs, resolved and checked before Ray starts: the config (its model filled in), the model,
    the classes to distil, and the listing to read, or the statistics that --from-stats names."""

    cfg: DistillConfig
    info: object  # models.loading.ModelInfo
    timestep: int
    names: dict[int, str]
    native: int | None
    listing: object = None  # data.listing.Listing
    stats: object = None  # steps.estimate.ClassStatistics

    @property
    def output_size(self) -> int:
        return self.cfg.output_size or int(self.native or self.info.spec.resolution)


def run(cfg: DistillConfig) -> DistillResult:
    """Run the job (docs/distill.md); the manifest is written whatever the outcome, and the same command resumes.

    The manifest's "status" is "complete", "incomplete" (some classes could not be distilled: they are
    named in "undistilled") or "failed" (with the reason).
    """
    from d3hr_ray.steps.generation import generate_classes
    from d3hr_ray.steps.real_candidates import choose_real_images

    t_start = time.perf_counter()
    # List: the model, and the input or the statistics file, checked before Ray starts.
    job = _open(cfg)
    cfg, spec, names = job.cfg, job.info.spec, job.names
    # Plan: --dry-run counts the work and stops (no Ray, no weights, nothing written).
    if cfg.dry_run:
        from d3hr_ray.steps.plan import make_plan

        return DistillResult(
            plan=make_plan(cfg, spec, job.info.configs, job.listing, dict(sorted(names.items())), job.output_size)
        )
    # Start: the output (resume check), Ray, the resources; the MLflow run (--mlflow), continued on a rerun.
    out, state, res, report = _start(job)
    mlflow_run = tracking.start(
        cfg.mlflow,
        out,
        "d3hr_ray.distill",
        out.uri.rstrip("/").rsplit("/", 1)[-1],
        cfg.to_dict(),
        experiment_flag=cfg.mlflow_experiment,
    )
    error = None
    try:
        # Statistics: stages 1-3 (or the --from-stats file).
        stats = job.stats or _statistics(job, res, out, state, report)
        names = {c: n for c, n in names.items() if c not in stats.short}
        # Generation: stages 4-5 (or D3HR's selection among the real images).
        if not cfg.stats_only and names:
            if cfg.candidates_from == "real":
                gen = choose_real_images(
                    cfg,
                    spec,
                    job.info.class_names,
                    stats.mean,
                    stats.var,
                    names,
                    out,
                    state,
                    job.output_size,
                    job.listing,
                )
            else:
                gen = generate_classes(cfg, spec, res, stats.mean, stats.var, names, out, state, job.output_size)
            report.classes, report.scores = (
                gen.classes,
                {names[c]: s for c, s in sorted(gen.scores.items()) if c in names},
            )
            report.selected_keys = {names[c]: keys for c, keys in gen.selected_keys.items() if c in names}
            report.timings.merge(gen.timings)
        report.status = "incomplete" if report.undistilled else "complete"
    except BaseException as e:  # KeyboardInterrupt and Ray's errors too: the manifest says what happened
        report.fail(e)
        error = e
        raise
    finally:
        # Report: manifest.json in every outcome (and to MLflow).
        report.timings.add("total", len(names) * (0 if cfg.stats_only else cfg.ipc), time.perf_counter() - t_start)
        manifest = _write_manifest(job, out, res, report, names)
        _write_report_html(job, out, state, report, manifest, names)
        _track(mlflow_run, out, manifest, error)
    return DistillResult(manifest=manifest, output=out.uri, timings=report.timings)


def _track(mlflow_run, out, manifest: dict, error: BaseException | None) -> None:
    """The run's stage timings, manifest and grid to MLflow, and its end (nothing without --mlflow)."""
    if mlflow_run is None:
        return
    metrics = {}
    for stage, t in manifest["stages"].items():  # "select (actor s)" -> select_actor_s/seconds
        name = re.sub(r"[^A-Za-z0-9]+", "_", stage).strip("_")
        metrics.update({f"{name}/seconds": t["seconds"], f"{name}/items_per_s": t["items_per_s"]})
    for what in ("read", "used", "skipped"):  # images, summed over the classes
        metrics[f"images_{what}"] = sum(c.get(what, 0) for c in manifest["counts"].values())
    metrics["classes_undistilled"] = len(manifest["undistilled"])
    tracking.log_metrics(mlflow_run, metrics)
    tracking.log_artifact(mlflow_run, "manifest.json", out.read("manifest.json"))
    if out.exists("grid.png"):
        tracking.log_artifact(mlflow_run, "grid.png", out.read("grid.png"))
    tracking.finish(mlflow_run, error)


def _open(cfg: DistillConfig) -> _Job:
    """Resolve the model and read the listing (or the statistics file); every problem a JobError, before Ray."""
    from d3hr_ray.artifacts.outputs import read_stats
    from d3hr_ray.stages.diffusion import ddim_timesteps

    tensors, stats_meta = {}, {}
    if cfg.from_stats:
        try:
            tensors, stats_meta = read_stats(cfg.from_stats)
        except FileNotFoundError as e:
            raise JobError(f"--from-stats: {e}") from None
    model = cfg.model or stats_meta.get("model") or (_BUILTIN_DIGITS if cfg.data.startswith("digits") else None)
    if model is None:
        raise JobError(
            "--model is required for --data other than digits (a DiTPipeline folder, s3:// prefix or hub id)"
        )
    cfg = dataclasses.replace(cfg, model=model)
    info = _model_info(cfg)
    timestep = ddim_timesteps(info.spec, cfg.steps)[cfg.inversion_step]
    if cfg.from_stats:
        stats, names, native = _from_stats(cfg, info.spec, stats_meta, tensors, timestep)
        return _Job(cfg, info, timestep, names, native, stats=stats)
    if cfg.plan_images is not None:  # --dry-run from counts: nothing listed, nothing read
        from d3hr_ray.steps.plan import planned_data

        try:
            listing = planned_data(cfg.plan_images, cfg.plan_classes, cfg.shard_size, info.class_names)
        except ValueError as e:
            raise JobError(str(e)) from None
    else:
        listing = _listing(cfg, info)
    return _Job(cfg, info, timestep, listing.names, listing.native_size, listing=listing)


def _model_info(cfg: DistillConfig):
    """The model's ModelInfo from its configs. A dry run of a hub model whose shape ships with the package
    (models/loading.BUNDLED_SHAPES) plans from the bundled configs when the hub cannot be reached, and always with
    --plan-images (offline, no credentials); a --plan-classes above the model's classes plans a DiT of its shape
    with that many classes."""
    from d3hr_ray.models.loading import BUNDLED_SHAPES, ModelSourceError, bundled_model_info, model_info

    bundled = cfg.dry_run and cfg.model in BUNDLED_SHAPES
    if bundled and cfg.plan_images is not None:
        info = bundled_model_info(cfg.model)
        print(f"plan: {cfg.model} from the configs bundled with d3hr_ray (its shape; no hub, no weights)")
    else:
        try:
            info = model_info(cfg.model)
        except (ModelSourceError, ValueError) as e:
            if not bundled:
                raise JobError(str(e)) from None
            info = bundled_model_info(cfg.model)
            print(f"plan: {cfg.model} unreachable ({str(e).splitlines()[0][:120]}); planning from its bundled configs")
    if cfg.plan_classes is not None and cfg.plan_classes > info.spec.num_classes:
        c = cfg.plan_classes
        print(
            f"plan: {cfg.model} has {info.spec.num_classes:,} classes; planning a DiT of its shape with {c:,} "
            "(a model trained on the data's classes: the class embedding grows, a pass's FLOPs do not)"
        )
        spec = dataclasses.replace(info.spec, num_classes=c, null_class=c)
        tcfg = {**info.configs["transformer"], "num_embeds_ada_norm": c}
        info = dataclasses.replace(info, spec=spec, configs={**info.configs, "transformer": tcfg})
    return info


def _listing(cfg: DistillConfig, info):
    """--data listed for the model's classes (narrowed by --stats-per-class); a class that can never have a
    variance is refused."""
    from d3hr_ray.data.sources import list_source, per_class_subset, read_class_map, read_label_names, source_kind
    from d3hr_ray.storage.s3 import S3Error

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


def _from_stats(cfg: DistillConfig, spec, meta: dict, tensors: dict, timestep: int):
    """(ClassStatistics, names to distil, native size) from a statistics file."""
    from d3hr_ray.data.listing import select_classes
    from d3hr_ray.steps.estimate import ClassStatistics

    mean, var, n = tensors["mean"], tensors["var"], tensors["count"]
    if mean.shape != (spec.num_classes, spec.latent_dim):
        raise JobError(
            f"--from-stats: statistics are {mean.shape} but the model needs ({spec.num_classes}, {spec.latent_dim})"
        )
    if meta.get("timestep") and int(meta["timestep"]) != timestep:
        raise JobError(
            f"--from-stats: statistics are at timestep {meta['timestep']} but --steps/--inversion-step give {timestep}"
        )
    all_names = meta.get("class_names") or [str(i) for i in range(spec.num_classes)]
    have = {all_names[i]: i for i in range(spec.num_classes) if n[i] >= 2}
    try:
        names = select_classes(have, cfg.classes)
    except ValueError:
        missing = [c for c in cfg.classes if c not in have and not (c.isdigit() and int(c) in have.values())]
        raise JobError(f"--classes: {missing[0]!r} has no statistics in {cfg.from_stats}") from None
    return ClassStatistics(mean, var, n, []), names, meta.get("native_size")


def _start(job: _Job):
    """(OutputDir, RunState, Resources, RunReport): the output checked and claimed (or resumed), Ray joined."""
    from d3hr_ray.artifacts.blocks import block_size
    from d3hr_ray.artifacts.state import RunState, StateMismatch
    from d3hr_ray.storage.fs import OutputDir
    from d3hr_ray.workers.resources import configure_data_context, init_ray, plan_resources

    cfg = job.cfg
    try:
        out = OutputDir(cfg.output)
        out.check_writable()
    except OSError as e:
        raise JobError(str(e).splitlines()[0]) from None
    if cfg.overwrite:
        clear_outputs(out)
    state = RunState(out)
    init_ray(cfg.verbose)
    configure_data_context(cfg.verbose)
    res = plan_resources(cfg)
    stats_key, gen_key = _keys(cfg, res.dtype, job.output_size, res.device)
    listing = job.listing
    block = block_size(len(listing.shards), sum(listing.counts.values()), len(listing.counts)) if listing else 1
    try:
        resumed = state.begin(stats_key, listing.fingerprint if listing else None, gen_key, block)["resumed"]
    except StateMismatch as e:
        raise JobError(str(e)) from None
    return out, state, res, RunReport(resumed=resumed)


def clear_outputs(out) -> None:
    """--overwrite: remove every file a run writes (`_OUTPUTS`) from the OutputDir `out`, and nothing else."""
    for rel in _OUTPUTS:
        out.remove(rel)


def _keys(cfg: DistillConfig, dtype: str, output_size: int | None, device: str) -> tuple[dict, dict | None]:
    """(what the statistics depend on, what the distilled set depends on besides them; None for --stats-only).

    classes_per_call: on a GPU a class's images depend at float precision on the group it is generated with, so
    the group size is part of the key (None when a call holds one class, as every run before groups did)."""
    from d3hr_ray.data.sources import read_class_map
    from d3hr_ray.steps.generation import classes_per_call

    stats_key = {
        "model": cfg.model,
        "data": cfg.data,
        "from_stats": cfg.from_stats,
        "classes": sorted(cfg.classes) if cfg.classes else None,
        "steps": cfg.steps,
        "inversion_step": cfg.inversion_step,
        "guidance": cfg.guidance,
        "encode": cfg.encode,
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "dtype": dtype,
        "stats_per_class": cfg.stats_per_class,
        "class_names": cfg.class_names,
        "class_map": read_class_map(cfg.class_map),  # its content: the same file edited maps classes elsewhere
    }
    if cfg.stats_only:
        return stats_key, None
    group = 1 if cfg.candidates_from == "real" else classes_per_call(cfg.images_per_call, device, cfg.ipc)
    return stats_key, {
        "ipc": cfg.ipc,
        "candidates": cfg.candidates,
        "score_weights": list(cfg.score_weights),
        "latents": cfg.latents,
        "start_step": cfg.generation_start,
        "output_size": output_size,
        "candidates_from": None if cfg.candidates_from == "gaussian" else cfg.candidates_from,
        "classes_per_call": None if group == 1 else group,
    }


def _statistics(job: _Job, res, out, state, report: RunReport):
    """Stages 1-3 and stats.safetensors; the report gets per-class counts, skips and the undistillable classes."""
    from d3hr_ray.steps.estimate import compute_statistics, write_statistics

    cfg, spec, names = job.cfg, job.info.spec, job.names
    result = compute_statistics(cfg, spec, res, job.listing, state)
    report.shards = result.shards
    report.timings.merge(result.timings)
    t = time.perf_counter()
    all_names = [
        names.get(i, job.info.class_names[i] if job.info.class_names else str(i)) for i in range(spec.num_classes)
    ]
    meta = {
        "model": cfg.model,
        "steps": str(cfg.steps),
        "inversion_step": str(cfg.inversion_step),
        "timestep": str(job.timestep),
        "guidance": str(cfg.guidance),
        "encode": cfg.encode,
        "seed": str(cfg.seed),
        "data": cfg.data,
        "class_names": json.dumps(all_names),
        "native_size": str(job.native or spec.resolution),
    }
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


def _write_manifest(job: _Job, out, res, report: RunReport, names: dict[int, str]) -> dict:
    """Build and write manifest.json; a failed run that cannot write it says so and keeps its own error."""
    from d3hr_ray.artifacts.outputs import build_manifest, write_manifest

    spec, cfg = job.info.spec, job.cfg
    resolved = {
        **res.as_dict(),
        "output_size": job.output_size,
        "resolution": spec.resolution,
        "latent_shape": list(spec.latent_shape),
        "timestep": job.timestep,
    }
    subset = None
    if cfg.stats_per_class is not None:
        subset = {"per_class": cfg.stats_per_class, "inputs": sum(job.listing.counts.values()) if job.listing else None}
    manifest = build_manifest(cfg, report, resolved, names, subset)
    try:
        write_manifest(out, manifest)
    except Exception as e:
        if report.status != "failed":
            raise
        print(f"warning: could not write manifest.json ({type(e).__name__}: {e})", file=sys.stderr)
    return manifest


def _write_report_html(job: _Job, out, state, report: RunReport, manifest: dict, names: dict[int, str]) -> None:
    """The dataset card (README.md) and report.html from the manifest and the per-class state; a failed run that
    cannot write them keeps its error."""
    from d3hr_ray.artifacts.card import write_card
    from d3hr_ray.artifacts.report_html import write_report

    try:
        write_card(out, manifest)
        write_report(out, manifest, names, state, job.output_size, job.stats.count if job.stats else None)
    except Exception as e:
        if report.status == "failed":
            print(f"warning: could not write README.md or report.html ({type(e).__name__}: {e})", file=sys.stderr)
        else:
            raise


def _report(cfg: DistillConfig, result: DistillResult) -> int:
    """The summary a user reads: the plan, or the stage table, skips, what was resumed and where the output is.
    Exit code 1 unless complete."""
    if result.plan is not None:
        from d3hr_ray.steps.plan import format_plan

        print(format_plan(result.plan, cfg))
        return 0
    m = result.manifest
    print(result.timings.table())
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} input(s); reasons in manifest.json")
    r = m["resume"]
    if r.get("resumed"):
        parts = [f"{r[k]['reused']} of {r[k]['total']} {k}" for k in ("shards", "classes") if k in r]
        print(f"resumed: reused {' and '.join(parts)} from an earlier run")
    print(f"output: {result.output} (open report.html in it to browse the set)")
    if m["status"] != "complete":
        for reason in m["reasons"]:
            print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from d3hr_ray.cli import main_for

    return main_for(
        argv, cls=DistillConfig, run=run, report=_report, prog="python -m d3hr_ray.distill", description=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
