"""MLflow tracking for every job, optional: `--mlflow URI` (or MLFLOW_TRACKING_URI) names the tracking server.

    start(uri, out, ...)     the job's MLflow run: created (with the job's settings as parameters), or, when the
                             output already records one (`<output>/mlflow.json`), continued: a resumed job
                             logs into the run it started, never a new one
    log_metrics(run, ...)    metrics at a step (training jobs: every epoch, from rank 0 of the workers)
    log_artifact(run, ...)   a file (results.json, manifest.json, a grid or a figure)
    finish(run, status)      FINISHED, or FAILED with the job's error
    tracked(...)             `with`: start, then finish as FINISHED, or FAILED with the error that left the block

Off when neither the flag nor the variable is set; needs the `mlflow` extra (mlflow-skinny) when on. The client
API is used directly (no global "active run"), so a Ray worker logs with the frozen `MLflowRun` it was handed.
A `file:` URI is MLflow's file store, which MLflow 3 keeps only behind MLFLOW_ALLOW_FILE_STORE: naming one with
--mlflow sets it. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from d3hr_ray.storage.fs import OutputDir

__all__ = [
    "RUN_FILE",
    "MLflowRun",
    "experiment_name",
    "finish",
    "log_artifact",
    "log_metrics",
    "start",
    "tracked",
    "tracking_uri",
]

# Where a job's output records its MLflow run, so that a rerun continues it.
RUN_FILE = "mlflow.json"
# MLflow keeps parameter values to this many characters.
_PARAM_CHARS = 500
# What MLflow allows in a metric's name (alphanumerics, _, -, ., space, /); anything else becomes "_".
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(frozen=True)
class MLflowRun:
    """A job's MLflow run, as workers get it: the tracking URI and the run's id."""

    uri: str
    run_id: str


def tracking_uri(flag: str | None) -> str | None:
    """--mlflow, else MLFLOW_TRACKING_URI, else None (tracking off)."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or None


def experiment_name(flag: str | None, default: str) -> str:
    """--mlflow-experiment, else MLFLOW_EXPERIMENT_NAME (as MLflow's own clients read it), else the job's `default`."""
    return flag or os.environ.get("MLFLOW_EXPERIMENT_NAME") or default


def _client(uri: str) -> MlflowClient:
    try:
        from mlflow.tracking import MlflowClient  # optional dependency (the mlflow extra): loaded with tracking on
    except ImportError:
        raise ValueError("--mlflow needs MLflow: pip install -e '.[mlflow]' in a checkout (mlflow-skinny)") from None
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for by name: MLflow 3 guards its file store
    return MlflowClient(tracking_uri=uri)


def _flat(params: Mapping[str, object], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = (json.dumps(v) if isinstance(v, list | tuple) else str(v))[:_PARAM_CHARS]
    return out


def start(
    flag: str | None,
    out: OutputDir,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    *,
    experiment_flag: str | None = None,
) -> MLflowRun | None:
    """The job's MLflow run (None when tracking is off): continued when `out` (an `storage.fs.OutputDir`) records one
    on the same tracking URI, else created with `params` (the job's settings, flattened) in the experiment
    `experiment_name(experiment_flag, experiment)` names (`experiment` is the job's default)."""
    uri = tracking_uri(flag)
    if uri is None:
        return None
    client = _client(uri)  # first: without MLflow installed, a one-line error saying how to add it
    from mlflow.entities import Param  # optional dependency (the mlflow extra): loaded with tracking on

    try:
        known = json.loads(out.read(RUN_FILE))
    except FileNotFoundError:
        known = None
    if known and known.get("uri") == uri:
        run = client.get_run(known["run_id"])
        client.update_run(run.info.run_id, status="RUNNING")
        return MLflowRun(uri, run.info.run_id)
    experiment = experiment_name(experiment_flag, experiment)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name)
    flat = _flat(params)
    keys = sorted(flat)
    for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters a batch
        client.log_batch(run.info.run_id, params=[Param(k, flat[k]) for k in keys[i : i + 100]])
    out.write_bytes(RUN_FILE, json.dumps({"uri": uri, "run_id": run.info.run_id}).encode())
    return MLflowRun(uri, run.info.run_id)


def log_metrics(run: MLflowRun | None, metrics: Mapping[str, object], step: int | None = None) -> None:
    """The numeric entries of `metrics` at `step` (others are skipped); nothing when tracking is off."""
    if run is None:
        return
    from mlflow.entities import Metric  # optional dependency (the mlflow extra): loaded with tracking on

    now = int(time.time() * 1000)
    numbers = [
        Metric(_NOT_IN_A_NAME.sub("_", k), float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    if numbers:
        _client(run.uri).log_batch(run.run_id, metrics=numbers)


def log_artifact(run: MLflowRun | None, name: str, data: bytes, folder: str | None = None) -> None:
    """`data` as the run's artifact `name` (in its `folder`, if given); nothing when tracking is off."""
    if run is None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data)
        _client(run.uri).log_artifact(run.run_id, path, artifact_path=folder)


def finish(run: MLflowRun | None, error: BaseException | None = None) -> None:
    """Mark the run FINISHED, or FAILED (with the first line of the error as a tag)."""
    if run is None:
        return
    client = _client(run.uri)
    if error is not None:
        client.set_tag(run.run_id, "error", (str(error).splitlines() or [type(error).__name__])[0][:500])
    client.set_terminated(run.run_id, status="FAILED" if error is not None else "FINISHED")


@contextmanager
def tracked(
    flag: str | None,
    out: OutputDir,
    experiment: str,
    run_name: str,
    params: Mapping[str, object],
    *,
    experiment_flag: str | None = None,
) -> Iterator[MLflowRun | None]:
    """`start(...)` for the block's duration: the run ends FINISHED, or FAILED with the error that left the block
    (re-raised). Yields None when tracking is off."""
    run = start(flag, out, experiment, run_name, params, experiment_flag=experiment_flag)
    try:
        yield run
    except BaseException as e:
        finish(run, e)
        raise
    finish(run)
