"""train_teacher on the tests' Ray (the digits teacher that evaluate's tests share, tests/conftest.py)."""

import json
from pathlib import Path

import pytest

from d3hr_ray.flags import ConfigError, config_from_args
from d3hr_ray.train_teacher import TeacherConfig


def test_teacher_learns_digits_and_writes_its_folder(digits_teacher):
    meta = json.loads((Path(digits_teacher["output"]) / "teacher.json").read_text())
    assert meta["arch"] == "conv3" and meta["class_names"] == [str(i) for i in range(10)]
    # Counted by the workers as they stream (no counting pass before training): every image, none refused.
    assert meta["train_images"] == 1348 and meta["test_images"] == 449 and meta["train_refused"] == 0
    assert all(h["train_images"] == 1348 for h in meta["history"])
    assert meta["test_top1"] > 0.5  # chance is 0.1


def test_teacher_logs_its_run_to_mlflow(digits_teacher):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=digits_teacher["mlflow"])
    experiment = client.get_experiment_by_name("d3hr_ray.train_teacher")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "teacher"
    assert run.data.params["epochs"] == "3" and run.data.params["data"] == "digits:train"
    # One point an evaluation (--eval-every 3 of 3 epochs), logged by the workers' rank 0, equal to the history.
    meta = json.loads((Path(digits_teacher["output"]) / "teacher.json").read_text())
    top1 = client.get_metric_history(run.info.run_id, "top1")
    assert [(m.step, m.value) for m in top1] == [(h["epoch"], pytest.approx(h["top1"])) for h in meta["history"]]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["teacher.json", "top1-by-epoch.png"]
    png = client.download_artifacts(run.info.run_id, "top1-by-epoch.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--arch"):
        config_from_args(TeacherConfig, ["--arch", "resnet7"])
    with pytest.raises(ConfigError, match="--crop-scale"):
        config_from_args(TeacherConfig, ["--crop-scale", "0.9,0.5"])
    with pytest.raises(ConfigError, match="--num-workers"):
        config_from_args(TeacherConfig, ["--num-workers", "0"])
