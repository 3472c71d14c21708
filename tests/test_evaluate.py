"""train_teacher and evaluate on Ray Train (local Ray, CPU workers, digits at 16 px, a few epochs)."""

import json
from pathlib import Path

import numpy as np
import pytest

from d3hr_ray.config import ConfigError, build_parser, config_from_args
from d3hr_ray.evaluate import EvaluateConfig, main, run
from d3hr_ray.train_teacher import TeacherConfig
from d3hr_ray.train_teacher import run as train_teacher


@pytest.fixture(scope="module")
def teacher(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    out = train_teacher(config_from_args(
        ["--data", "digits:train", "--test", "digits:test", "--resolution", "16", "--epochs", "3", "--eval-every", "3",
         "--cache-gb", "0",  # both sets stream from Ray Data shards: the path of a data set too big to cache
         "--output", str(root / "t"), "--storage-path", str(root / "runs"), "--name", "teacher"],
        build_parser(cls=TeacherConfig)))
    return out


def ev(*argv):
    return config_from_args(list(argv), build_parser(cls=EvaluateConfig))


def test_teacher_learns_digits_and_writes_its_folder(teacher):
    meta = json.loads((Path(teacher["output"]) / "teacher.json").read_text())
    assert meta["arch"] == "conv3" and meta["class_names"] == [str(i) for i in range(10)]
    # Counted by the workers as they stream (no counting pass before training): every image, none refused.
    assert meta["train_images"] == 1348 and meta["test_images"] == 449 and meta["train_refused"] == 0
    assert all(h["train_images"] == 1348 for h in meta["history"])
    assert meta["test_top1"] > 0.5  # chance is 0.1


def test_two_workers_write_results(teacher, tmp_path):
    out = tmp_path / "eval"
    res = run(ev("--baseline", "random-real", "--real", "digits:train", "--ipc", "2", "--test", "digits:test",
                 "--teacher", teacher["output"], "--epochs", "4", "--eval-every", "2", "--repeats", "2", "--num-workers", "2",
                 "--output", str(out), "--storage-path", str(tmp_path / "runs"), "--name", "two"), command="cmd")
    saved = json.loads((out / "results.json").read_text())
    assert saved["repeats"] == 2 and [r["seed"] for r in saved["per_repeat"]] == [0, 1]
    assert all(r["train_images"] == 20 and r["train_refused"] == 0 for r in saved["per_repeat"])  # 2 per class x 10 classes
    assert all(r["settings"]["epochs"] == 4 and r["settings"]["ipc"] == 2 and r["settings"]["crop_scale"] == [0.08, 1.0]
               for r in saved["per_repeat"])
    assert all(r["test_images"] == 449 for r in saved["per_repeat"])
    assert [h["epoch"] for h in saved["per_repeat"][0]["history"]] == [2, 4]
    top1 = np.array([r["best_top1"] for r in saved["per_repeat"]]) * 100
    assert saved["top1_mean"] == pytest.approx(top1.mean()) and saved["top1_std"] == pytest.approx(top1.std())
    assert 0.0 <= res["top1_mean"] <= 100.0
    assert (out / "results.md").read_text().startswith("| random real, IPC 2 | conv3 | 2 |")
    # A rerun skips the finished repeats: same numbers, no training.
    again = run(ev("--baseline", "random-real", "--real", "digits:train", "--ipc", "2", "--test", "digits:test",
                   "--teacher", teacher["output"], "--epochs", "4", "--eval-every", "2", "--repeats", "2", "--num-workers", "2",
                   "--output", str(out), "--storage-path", str(tmp_path / "runs"), "--name", "two"))
    assert again["per_repeat"] == saved["per_repeat"]
    # A rerun into the same output with a setting the results depend on changed is refused, naming it.
    with pytest.raises(ValueError, match=r"\(epochs, eval_every differ\).*another --output"):
        run(ev("--baseline", "random-real", "--real", "digits:train", "--ipc", "2", "--test", "digits:test",
               "--teacher", teacher["output"], "--epochs", "6", "--eval-every", "3", "--repeats", "2", "--num-workers", "2",
               "--output", str(out), "--storage-path", str(tmp_path / "runs"), "--name", "two"))
    assert json.loads((out / "results.json").read_text())["per_repeat"] == saved["per_repeat"]  # left as it was
    # The same run name continued to more epochs, into another output and on one worker instead of two (an elastic
    # cluster that shrank): the first repeat resumes from its checkpoint.
    more = run(ev("--baseline", "random-real", "--real", "digits:train", "--ipc", "2", "--test", "digits:test",
                  "--teacher", teacher["output"], "--epochs", "6", "--eval-every", "2", "--repeats", "1", "--num-workers", "1",
                  "--output", str(tmp_path / "more"), "--storage-path", str(tmp_path / "runs"), "--name", "two"))
    history = more["per_repeat"][0]["history"]
    assert [h["epoch"] for h in history] == [2, 4, 6]
    assert history[:2] == saved["per_repeat"][0]["history"]  # epochs 1-4 came from the checkpoint, not rerun


def test_errors_name_the_flag(capsys):
    with pytest.raises(ConfigError, match="--distilled"):
        EvaluateConfig()
    with pytest.raises(ConfigError, match="--ipc"):
        ev("--baseline", "random-real", "--real", "digits:train")
    with pytest.raises(ConfigError, match="--student"):
        ev("--distilled", "x", "--student", "resnet7")
    assert main(["--baseline", "full"]) == 2
    assert "--real" in capsys.readouterr().err
