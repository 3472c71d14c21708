"""`python -m d3hr_ray.distill`: distil an image data set with D3HR on Ray.

    list -> plan (--dry-run stops here)                                      steps/inputs.py, plan.py
         -> statistics: read + preprocess (CPU tasks) -> encode + invert + partial statistics (model actors)
            -> merge partials (the driver: O(classes x D) memory)          steps/estimate.py
         -> generation: per class, select a group + sample + decode (model actors), or D3HR's
            selection among the real images (--candidates-from real)        steps/generation.py, real_candidates.py
         -> outputs and the report (manifest.json in every outcome)         artifacts/run_files.py

Runs unchanged on a laptop (a local Ray instance is started), on a running cluster (RAY_ADDRESS) and
under `ray job submit`. With no flags it distils scikit-learn's digits with the bundled model into
./d3hr-output/. Flags and a YAML --config take the same keys; flags win.

Outputs: stats.safetensors, latents.safetensors, images/<class>/<k>.png, distilled.parquet,
grid.png, manifest.json, README.md (the dataset card), report.html (see docs/distill.md).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from d3hr_ray import tracking
from d3hr_ray.artifacts.blocks import block_size
from d3hr_ray.artifacts.outputs import clear_outputs, versions
from d3hr_ray.artifacts.report import Manifest, RunReport, Timings
from d3hr_ray.artifacts.run_files import log_run, write_run_files
from d3hr_ray.artifacts.state import RunState, StateMismatch, run_keys
from d3hr_ray.cli import main_for
from d3hr_ray.config import DistillConfig
from d3hr_ray.errors import JobError
from d3hr_ray.steps.estimate import estimate_statistics
from d3hr_ray.steps.generation import classes_per_call, generate_classes
from d3hr_ray.steps.inputs import open_job
from d3hr_ray.steps.job import Job
from d3hr_ray.steps.plan import Plan, format_plan, make_plan
from d3hr_ray.steps.real_candidates import choose_real_images
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.workers.resources import Resources, configure_data_context, init_ray, plan_resources

__all__ = ["DistillResult", "clear_outputs", "main", "run"]


@dataclass(frozen=True)
class DistillResult:
    """What `run` returns: the plan (--dry-run), or manifest.json's content as written, the output's location and
    the timings."""

    plan: Plan | None = None
    manifest: dict[str, Any] | None = None
    output: str | None = None
    timings: Timings | None = None


def run(cfg: DistillConfig) -> DistillResult:
    """Run the job (docs/distill.md); the manifest is written whatever the outcome, and the same command resumes.

    The manifest's "status" is "complete", "incomplete" (some classes could not be distilled: they are
    named in "undistilled") or "failed" (with the reason).
    """
    t_start = time.perf_counter()
    # List: the model, and the input or the statistics file, checked before Ray starts.
    job = open_job(cfg)
    cfg, spec, names = job.cfg, job.info.spec, job.names
    # Plan: --dry-run counts the work and stops (no Ray, no weights, nothing written).
    if cfg.dry_run:
        return DistillResult(
            plan=make_plan(cfg, spec, job.info.configs or {}, job.listing, dict(sorted(names.items())), job.output_size)
        )
    # Start: the output (resume check), Ray, the resources; the MLflow run (--mlflow), continued on a rerun.
    out, state, resources, report = _start(job)
    run_name = out.uri.rstrip("/").rsplit("/", 1)[-1]
    with tracking.tracked(
        cfg.mlflow, out, "d3hr_ray.distill", run_name, cfg.to_dict(), experiment_flag=cfg.mlflow_experiment
    ) as mlflow_run:
        try:
            # Statistics: stages 1-3 (or the --from-stats file).
            stats = job.stats or estimate_statistics(job, resources, out, state, report)
            names = {c: n for c, n in names.items() if c not in stats.short}
            # Generation: stages 4-5 (or D3HR's selection among the real images).
            if not cfg.stats_only and names:
                if cfg.candidates_from == "real":
                    gen = choose_real_images(job, stats, names, out, state)
                else:
                    gen = generate_classes(job, resources, stats, names, out, state)
                report.classes = gen.classes
                report.scores = {names[c]: s for c, s in sorted(gen.scores.items()) if c in names}
                report.selected_keys = {names[c]: keys for c, keys in gen.selected_keys.items() if c in names}
                report.timings.merge(gen.timings)
            report.status = "incomplete" if report.undistilled else "complete"
        except BaseException as e:  # KeyboardInterrupt and Ray's errors too: the manifest says what happened
            report.fail(e)
            raise
        finally:
            # Report: manifest.json, README.md and report.html in every outcome (and to MLflow).
            report.timings.add("total", len(names) * (0 if cfg.stats_only else cfg.ipc), time.perf_counter() - t_start)
            manifest = Manifest.build(cfg, report, job.resolved(resources), names, job.stats_subset(), versions())
            write_run_files(out, manifest, names, state, job.output_size, job.stats.count if job.stats else None)
            log_run(mlflow_run, out, manifest)
    return DistillResult(manifest=manifest.to_json(), output=out.uri, timings=report.timings)


def _start(job: Job) -> tuple[OutputDir, RunState, Resources, RunReport]:
    """The output checked and claimed (or resumed), Ray joined, the resources planned."""
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
    resources = plan_resources(cfg)
    group = 1 if cfg.candidates_from == "real" else classes_per_call(cfg.images_per_call, resources.device, cfg.ipc)
    stats_key, gen_key = run_keys(cfg, resources.dtype, job.output_size, group)
    listing = job.data
    block = block_size(len(listing.shards), sum(listing.counts.values()), len(listing.counts)) if listing else 1
    try:
        resumed = state.begin(stats_key, listing.fingerprint if listing else None, gen_key, block)["resumed"]
    except StateMismatch as e:
        raise JobError(str(e)) from None
    return out, state, resources, RunReport(resumed=resumed)


def _report(cfg: DistillConfig, result: DistillResult) -> int:
    """The summary a user reads: the plan, or the stage table, skips, what was resumed and where the output is.
    Exit code 1 unless complete."""
    if result.plan is not None:
        print(format_plan(result.plan, cfg))
        return 0
    if result.manifest is None or result.timings is None:
        raise ValueError("a DistillResult holds a plan or a manifest and its timings")
    m = Manifest.from_json(result.manifest)
    print(result.timings.table())
    if m.skipped:
        print(f"skipped {len(m.skipped)} input(s); reasons in manifest.json")
    if m.resume.get("resumed"):
        work = {"shards": m.resume.get("shards"), "classes": m.resume.get("classes")}
        parts = [f"{w['reused']} of {w['total']} {k}" for k, w in work.items() if w]
        print(f"resumed: reused {' and '.join(parts)} from an earlier run")
    print(f"output: {result.output} (open report.html in it to browse the set)")
    if m.status != "complete":
        for reason in m.reasons:
            print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(
        argv, cls=DistillConfig, run=run, report=_report, prog="python -m d3hr_ray.distill", description=__doc__
    )


if __name__ == "__main__":
    sys.exit(main())
