"""The files that say what a run did, written in every outcome: manifest.json, README.md (the dataset card) and
report.html; and the same to MLflow (--mlflow)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from d3hr_ray import tracking
from d3hr_ray.artifacts.card import write_card
from d3hr_ray.artifacts.outputs import manifest_bytes, write_manifest
from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.artifacts.report_html import write_report
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.storage.fs import OutputDir

__all__ = ["log_run", "write_run_files"]


def write_run_files(
    out: OutputDir,
    manifest: Manifest,
    names: dict[int, str],
    state: RunState,
    output_size: int | None,
    stats_count: np.ndarray | None,
) -> None:
    """manifest.json, then README.md and report.html (from the manifest and the per-class state). A failed run that
    cannot write one says so on stderr and keeps its own error; any other run raises.

    Args:
        names: class id -> name of the classes the run distils; stats_count: (C,) inputs per class of a
            --from-stats file (report.html's "inputs used" where the manifest has no counts), else None.
    """

    def report() -> None:
        write_card(out, manifest)
        write_report(out, manifest, names, state, output_size, stats_count)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("manifest.json", lambda: write_manifest(out, manifest)),
        ("README.md or report.html", report),
    ]
    for what, write in steps:
        try:
            write()
        except Exception as e:
            if manifest.status != "failed":
                raise
            print(f"warning: could not write {what} ({type(e).__name__}: {e})", file=sys.stderr)


def log_run(run: tracking.MLflowRun | None, out: OutputDir, manifest: Manifest) -> None:
    """The run's stage timings and counts (`Manifest.metrics`), manifest.json and grid.png to MLflow (nothing without
    --mlflow)."""
    if run is None:
        return
    tracking.log_metrics(run, manifest.metrics())
    tracking.log_artifact(run, "manifest.json", manifest_bytes(manifest))
    if out.exists("grid.png"):
        tracking.log_artifact(run, "grid.png", out.read("grid.png"))
