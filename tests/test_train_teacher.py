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


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--arch"):
        config_from_args(TeacherConfig, ["--arch", "resnet7"])
    with pytest.raises(ConfigError, match="--crop-scale"):
        config_from_args(TeacherConfig, ["--crop-scale", "0.9,0.5"])
    with pytest.raises(ConfigError, match="--num-workers"):
        config_from_args(TeacherConfig, ["--num-workers", "0"])
