"""The Ray Train harness: the V2 flag at import, run specs, and the checkpoint round trip of a worker.

The worker-side functions call `ray.train.get_checkpoint` and `ray.train.report`; here those are
replaced by a recorder, so that a save -> resume -> finish sequence runs in-process in milliseconds
(the jobs' tests run the same functions under a real TorchTrainer).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from d3hr_ray.training import harness

JOBS = ("d3hr_ray.finetune", "d3hr_ray.train_teacher", "d3hr_ray.evaluate")


def test_configs_parse_without_torch_and_ray_train_v2_is_an_explicit_call():
    # In a fresh interpreter: the four jobs import, and each parses its flags (and a bad one fails), without
    # torch or ray.train; the explicit call then selects V2 (a user's RAY_TRAIN_V2_ENABLED=0 is overridden).
    code = """
import os, sys
from d3hr_ray.flags import ConfigError, config_from_args
from d3hr_ray.config import DistillConfig
from d3hr_ray.evaluate import EvaluateConfig
from d3hr_ray.finetune import FinetuneConfig
from d3hr_ray.train_teacher import TeacherConfig
from d3hr_ray.training.harness import use_train_v2
config_from_args(DistillConfig, ["--ipc", "3", "--stats-per-class", "5"])
config_from_args(EvaluateConfig, ["--baseline", "herding", "--real", "r", "--ipc", "2", "--teacher", "t",
                                  "--num-workers", "2"])
config_from_args(FinetuneConfig, ["--train-vae", "--name", "x"])
config_from_args(TeacherConfig, ["--arch", "resnet18"])
try:
    config_from_args(EvaluateConfig, ["--distilled", "d", "--student", "resnet7"])
except ConfigError:
    pass
loaded = sorted(m for m in ("torch", "diffusers", "ray.train") if m in sys.modules)
use_train_v2()
print(loaded, os.environ["RAY_TRAIN_V2_ENABLED"])
"""
    env = {**os.environ, harness.TRAIN_V2_FLAG: "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[] 1"
    # Too late is an error, not a silent V1 run: ray.train imported while the flag said 0.
    late = "import os; import ray.train; from d3hr_ray.training.harness import use_train_v2; use_train_v2()"
    proc = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "RAY_TRAIN_V2_ENABLED=0" in proc.stderr


def test_each_training_entry_point_selects_train_v2_first(monkeypatch):
    import importlib

    for m in JOBS:
        job = importlib.import_module(m)
        calls = []
        monkeypatch.setattr(harness, "use_train_v2", lambda calls=calls: calls.append(1))
        with pytest.raises(SystemExit):  # argparse's usage error, exit 2: after the call, before any Ray
            job.main(["--no-such-flag"])
        assert calls, f"{m}.main does not call harness.use_train_v2()"


def test_run_spec():
    job = SimpleNamespace(name="run", num_workers=3, max_failures=1, storage_path=None)
    spec = harness.RunSpec.of(job, use_gpu=False, name="run-vae")
    assert (spec.name, spec.num_workers, spec.use_gpu, spec.max_failures) == ("run-vae", 3, False, 1)
    assert spec.storage == str(Path("~/ray_results").expanduser())
    assert (
        harness.RunSpec.of(SimpleNamespace(**{**vars(job), "storage_path": "s3://b/runs"}), use_gpu=True).storage
        == "s3://b/runs"
    )
    with pytest.raises(ValueError, match="name"):
        harness.RunSpec(name="a/b", num_workers=1, use_gpu=False, max_failures=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"


class FakeTrain:
    """Stands in for ray.train's session: the last checkpoint, and what the workers report."""

    def __init__(self, tmp: Path):
        self.tmp, self.checkpoint, self.reports = tmp, None, []

    def get_checkpoint(self):
        return self.checkpoint

    def report(self, metrics, checkpoint=None):
        import ray.train

        kept = None
        if checkpoint is not None:  # Ray copies the folder to storage before the worker deletes it
            with checkpoint.as_directory() as d:
                kept = self.tmp / f"ckpt-{len(self.reports)}"
                shutil.copytree(d, kept)
            self.checkpoint = ray.train.Checkpoint.from_directory(kept)
        self.reports.append((metrics, kept))


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    import ray.train

    fake = FakeTrain(tmp_path)
    monkeypatch.setattr(ray.train, "get_checkpoint", fake.get_checkpoint)
    monkeypatch.setattr(ray.train, "report", fake.report)
    return fake


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def test_a_fresh_run_has_nothing_to_resume(fake_train):
    loaded, resumed = harness.resume(lambda d: pytest.fail("no checkpoint to load"))
    assert loaded is None and resumed == harness.Resumed(start=0, history=[], state={}, optimizer=None)
    assert not harness.finish_if_done(resumed, epochs=3, rank=0)
    assert fake_train.reports == []


def test_save_resume_finish_round_trip(fake_train):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()  # an optimizer with state (exp_avg, exp_avg_sq, step)
    history = [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5}]

    def save(d):
        torch.save(model.state_dict(), d / "model.pt")

    harness.save_and_report(
        {"loss": 9.0}, rank=1, save_model=pytest.fail, optimizer=opt, state={"epoch": 1, "history": history}
    )
    assert fake_train.reports == [({"loss": 9.0}, None)]  # rank 1 writes nothing
    harness.save_and_report(
        history[-1],
        rank=0,
        save_model=save,
        optimizer=opt,
        state={"epoch": 1, "history": history, "best": {"top1": 0.5}},
    )
    folder = fake_train.reports[-1][1]
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt", "optimizer.pt", "state.json"]
    assert json.loads((folder / "state.json").read_text()) == {"epoch": 1, "history": history, "best": {"top1": 0.5}}

    other = _model(1)

    def load(d):
        other.load_state_dict(torch.load(d / "model.pt", weights_only=True))
        return other

    loaded, resumed = harness.resume(load)
    assert loaded is other and all(
        torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert (resumed.start, resumed.history, resumed.state["best"]) == (2, history, {"top1": 0.5})
    fresh_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    fresh_opt.load_state_dict(resumed.optimizer)
    want = opt.state_dict()["state"][0]
    got = fresh_opt.state_dict()["state"][0]
    assert all(torch.equal(got[k], want[k]) for k in ("exp_avg", "exp_avg_sq", "step"))

    assert not harness.finish_if_done(resumed, epochs=3, rank=0)  # epoch 2 still to run
    n = len(fake_train.reports)
    assert harness.finish_if_done(resumed, epochs=2, rank=0, metrics={"final": True})
    metrics, again = fake_train.reports[n]
    assert metrics == {"final": True} and (again / "state.json").read_text() == (folder / "state.json").read_text()
    assert harness.finish_if_done(resumed, epochs=2, rank=1)
    assert fake_train.reports[n + 1] == (history[-1], None)


def test_checkpoint_state_reads_the_last_checkpoint(tmp_path):
    import ray.train

    (tmp_path / "state.json").write_text(json.dumps({"epoch": 4, "history": [{"epoch": 4}], "best": {"top1": 1.0}}))
    result = SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(tmp_path))
    assert harness.checkpoint_state(result) == {"epoch": 4, "history": [{"epoch": 4}], "best": {"top1": 1.0}}
