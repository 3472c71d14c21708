"""One error policy for every command line: exit 2 for configuration, 1 for user errors, one line, no traceback."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from d3hr_ray import cli
from d3hr_ray.flags import ConfigError, require


@dataclass(frozen=True)
class ToyConfig:
    size: int = field(default=1, metadata={"help": "an integer >= 1"})
    path: str = field(default="x", metadata={"help": "a path"})

    def __post_init__(self):
        require(self, self.size >= 1, "size", "must be >= 1")


class JobFailed(RuntimeError):
    pass


def _main(run, argv=(), report=lambda cfg, out: print(f"ran {out}"), **kw):
    return cli.main_for(list(argv), cls=ToyConfig, run=run, report=report, prog="toy", **kw)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_success_prints_the_report_and_exits_0(capsys):
    assert _main(lambda cfg: cfg.size * 10, ["--size", "3"]) == cli.EXIT_OK == 0
    assert capsys.readouterr().out == "ran 30\n"
    assert _main(lambda cfg: 0, report=lambda cfg, out: 1) == 1  # the report decides, e.g. an incomplete job


def test_a_bad_flag_value_exits_2_naming_the_flag(capsys):
    ran = []
    assert _main(ran.append, ["--size", "0"]) == cli.EXIT_CONFIG == 2
    assert "--size" in _one_error_line(capsys) and ran == []  # refused before the job starts


def test_a_config_error_found_by_the_job_exits_2(capsys):
    def run(cfg):
        raise ConfigError("--path x differs from the model's y")

    assert _main(run) == 2
    assert _one_error_line(capsys) == "error: --path x differs from the model's y"


@pytest.mark.parametrize(
    "error", [FileNotFoundError("no such folder: /data"), ValueError("the set is\nempty"), PermissionError("read-only")]
)
def test_user_errors_exit_1_on_one_line(error, capsys):
    def run(cfg):
        raise error

    assert _main(run) == cli.EXIT_USER == 1
    assert _one_error_line(capsys) == "error: " + " ".join(str(error).split())


def test_a_job_error_class_is_a_user_error_only_when_named(capsys):
    def run(cfg):
        raise JobFailed("3 classes failed")

    assert _main(run, user_errors=(JobFailed,)) == 1
    assert _one_error_line(capsys) == "error: 3 classes failed"
    with pytest.raises(JobFailed):
        _main(run)


def test_a_bug_keeps_its_traceback():
    def run(cfg):
        return {}["missing"]

    with pytest.raises(KeyError):
        _main(run)


def test_an_error_from_a_ray_task_prints_its_cause(capsys):
    class RemoteError(FileNotFoundError):  # shaped like ray.exceptions.RayTaskError(FileNotFoundError)
        def __init__(self, cause):
            super().__init__('ray::read() (pid=1)\n  File "x.py", line 1\nFileNotFoundError: gone')
            self.cause = cause

    def run(cfg):
        raise RemoteError(FileNotFoundError("s3://b/k: gone"))

    assert _main(run) == 1
    assert _one_error_line(capsys) == "error: s3://b/k: gone"


def _watch_ray_start(monkeypatch) -> list:
    """Record every call of the training jobs' one way to Ray (another test's Ray may already be up)."""
    from d3hr_ray.training import harness

    started: list = []
    monkeypatch.setattr(harness, "start_ray", lambda *a, **k: started.append(1) or False)
    return started


@pytest.mark.parametrize(
    "module,argv,flag",
    [
        ("finetune", ["--dit", "XXL/2", "--train-vae"], "--dit"),
        ("finetune", ["--vae", "huge", "--train-vae"], "--vae"),
        ("finetune", ["--train-vae", "--class-dropout", "1.5"], "--class-dropout"),
        ("train_teacher", ["--arch", "resnet7"], "--arch"),
        ("train_teacher", ["--epochs", "0"], "--epochs"),
        ("evaluate", ["--baseline", "full"], "--real"),
        ("evaluate", ["--distilled", "x", "--student", "resnet7"], "--student"),
    ],
)
def test_every_job_refuses_a_bad_flag_before_ray_starts(module, argv, flag, capsys, monkeypatch):
    import importlib

    started = _watch_ray_start(monkeypatch)
    job = importlib.import_module(f"d3hr_ray.{module}")
    assert job.main(argv) == 2
    line = _one_error_line(capsys)
    assert flag in line
    assert not started


def test_registry_names_are_in_the_help_and_the_error(capsys):
    from d3hr_ray.finetune import main
    from d3hr_ray.models.build import VAE_CONFIGS, dit_sizes

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in dit_sizes()) and all(name in help_text for name in VAE_CONFIGS)
    assert main(["--dit", "huge", "--train-vae"]) == 2
    line = _one_error_line(capsys)
    assert all(name in line for name in dit_sizes())


def test_a_missing_init_model_exits_1_before_ray_starts(tmp_path, capsys, monkeypatch):
    from d3hr_ray.finetune import main

    started = _watch_ray_start(monkeypatch)
    assert main(["--init", str(tmp_path / "no-model"), "--output", str(tmp_path / "out")]) == 1
    assert "no-model" in _one_error_line(capsys)
    assert not started
