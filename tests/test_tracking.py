"""tracking.py against MLflow's own file store, read back through MLflow's client."""

import dataclasses
import json

import pytest

from d3hr_ray import tracking
from d3hr_ray.storage.fs import OutputDir


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"file://{tmp_path / 'mlruns'}"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_off_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = OutputDir(str(tmp_path / "out"))
    assert tracking.start(None, out, "x", "r", {"a": 1}) is None
    tracking.log_metrics(None, {"m": 1.0}, step=1)
    tracking.log_artifact(None, "a.txt", b"x")
    tracking.finish(None)
    assert not (tmp_path / "out" / tracking.RUN_FILE).exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///somewhere")
    assert tracking.tracking_uri(None) == "file:///somewhere" and tracking.tracking_uri("http://h") == "http://h"


def test_a_run_is_created_continued_and_finished(store, tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    params = {"epochs": 4, "crop_scale": (0.08, 1.0), "nested": {"k": "v"}, "none": None}
    run = tracking.start(store, out, "d3hr_ray.test", "first", params)
    assert json.loads((tmp_path / "out" / tracking.RUN_FILE).read_text()) == {"uri": store, "run_id": run.run_id}
    tracking.log_metrics(run, {"top1": 0.5, "encode+invert/seconds": 2.0, "stage": "dit", "flag": True}, step=2)
    tracking.log_metrics(run, {"top1": 0.75}, step=4)
    # A rerun into the same output continues the run: no second run in the experiment.
    again = tracking.start(store, out, "d3hr_ray.test", "second", params)
    assert again == run
    tracking.log_artifact(again, "results.json", b'{"ok": true}')
    tracking.finish(again)
    c = _client(store)
    got = c.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "first"
    assert got.data.params == {"epochs": "4", "crop_scale": "[0.08, 1.0]", "nested.k": "v", "none": "None"}
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "top1")] == [(2, 0.5), (4, 0.75)]
    assert set(got.data.metrics) == {
        "top1",
        "encode_invert/seconds",
    }  # names MLflow refuses are mended; strings skipped
    assert [a.path for a in c.list_artifacts(run.run_id)] == ["results.json"]
    experiment = c.get_experiment_by_name("d3hr_ray.test")
    assert len(c.search_runs([experiment.experiment_id])) == 1


def test_a_failed_job_marks_its_run_failed(store, tmp_path):
    run = tracking.start(store, OutputDir(str(tmp_path / "o")), "d3hr_ray.test", "r", {})
    tracking.finish(run, RuntimeError("the data went away\nand more"))
    got = _client(store).get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["error"] == "the data went away"


def test_the_experiment_is_the_flag_else_mlflow_experiment_name_else_the_jobs(store, tmp_path, monkeypatch):
    c = _client(store)

    def experiment_of(run):
        return c.get_experiment(c.get_run(run.run_id).info.experiment_id).name

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert (
        experiment_of(tracking.start(store, OutputDir(str(tmp_path / "a")), "d3hr_ray.test", "r", {}))
        == "d3hr_ray.test"
    )
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-distill")
    assert (
        experiment_of(tracking.start(store, OutputDir(str(tmp_path / "b")), "d3hr_ray.test", "r", {})) == "team-distill"
    )
    flagged = tracking.start(store, OutputDir(str(tmp_path / "c")), "d3hr_ray.test", "r", {}, experiment_flag="mine")
    assert experiment_of(flagged) == "mine"
    assert [len(c.search_runs([c.get_experiment_by_name(n).experiment_id])) for n in ("team-distill", "mine")] == [1, 1]


def test_every_job_has_the_experiment_flag():
    from d3hr_ray.config import DistillConfig
    from d3hr_ray.flags import config_from_args
    from d3hr_ray.training.harness import TrainRunFields

    assert config_from_args(DistillConfig, ["--mlflow-experiment", "x"]).mlflow_experiment == "x"
    assert "mlflow_experiment" in {f.name for f in dataclasses.fields(TrainRunFields)}
