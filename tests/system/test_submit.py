"""The product as users run it: `ray job submit` against a real Ray head started with `ray start --head`.

One head per module (its own temp dir, free ports, dashboard and job server on 127.0.0.1, token
authentication with a token file of its own), two submissions through the `ray` CLI:

1. the digits job on its embedded default data and model (as `make demo` runs it, on a shorter DDIM grid);
   the working dir it ran in, as the head unpacked it from the upload, holds the package and none of what
   jobs/runtime-env.yaml excludes;
2. `evaluate` on the distilled set, with a teacher folder written by the test.

The head is started and stopped by tests/system/heads.py, by process id: `ray stop` would stop every Ray
instance on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from d3hr_ray.evaluation.teacher import save_teacher
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training.students import build_student
from tests.system.heads import RAY, Head, start_head

REPO = Path(__file__).resolve().parents[2]
HEAD_CPUS = 2  # the CI machine's cores: two single-threaded model actors (half a CPU each) and a read task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head (`ray start --head --block`) on 127.0.0.1; yields (env for the `ray` CLI, dashboard URL, its temp
    dir)."""
    root = tmp_path_factory.mktemp("head")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(
        os.environ,
        # The jobs run `python`: the interpreter (and packages) of this test run.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_TMPDIR=str(root / "tmp"),  # no other Ray instance on this machine is joined or disturbed
        RAY_USAGE_STATS_ENABLED="0",
        # Ray gives the dashboard (it hosts the job server) 60 s to start; on a busy 2-core machine its
        # subprocess modules took longer and `ray start` gave up. The raylet's 30 s window has no setting.
        RAY_DASHBOARD_STARTUP_TIMEOUT_S="240",
    )
    env.pop("RAY_ADDRESS", None)

    def job_server_answers(head: Head) -> bool:
        probe = [RAY, "job", "list", "--address", head.dashboard_url]
        return subprocess.run(probe, env=env, capture_output=True, text=True).returncode == 0

    def make(attempt: int) -> Head:
        temp_dir = Path("/tmp") / f"rh{os.getpid()}-{attempt}"  # Ray's socket paths must stay under 107 characters
        return Head(root / f"head-{attempt}.log", temp_dir, env, num_cpus=HEAD_CPUS, dashboard=True)

    started = start_head(make, job_server_answers)
    try:
        yield env, started.dashboard_url, started.temp_dir
    finally:
        started.stop()


def submit(head, submission_id: str, *entrypoint: str, timeout: float = 900) -> str:
    """`ray job submit` from the repository root; waits, then returns the job's logs (asserting SUCCEEDED)."""
    env, address, _ = head
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime-env.yaml",
        "--",
        *entrypoint,
    ]
    for _ in range(30):  # the job server answers before the head's agent takes jobs: Ray says to try again
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, submission_id], env=env, capture_output=True, text=True
    )
    assert f"Job '{submission_id}' succeeded" in status.stdout, (
        f"{status.stdout}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


# The embedded default's data and model (no --data, no --model), on a shorter DDIM grid (6 of 10 steps
# instead of 30 of 50, a fifth of the model passes) and 3 of its 10 classes (537 of the 1,797 images).
# Submission, upload, job driver, actors and every output are the same; the defaults themselves are checked
# in tests/test_config.py.
# On 2 cores the full default grid took 225 s of this module's 6 minutes, all classes on the short grid 99 s.
SHORT_GRID = ("--steps", "10", "--inversion-step", "6", "--classes", "0,1,2")


@pytest.fixture(scope="module")
def distilled(head, tmp_path_factory):
    """The digits job with its embedded default data and model, submitted as users submit it."""
    out = tmp_path_factory.mktemp("submit") / "digits"
    logs = submit(head, "distill-digits", "python", "-m", "d3hr_ray.distill", *SHORT_GRID, "--output", str(out))
    return out, logs


def test_digits_job_through_ray_job_submit(distilled):
    out, logs = distilled
    assert "encode+invert+stats" in logs and f"output: {out}" in logs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["data"] == "digits" and manifest["config"]["model"] == "builtin:digits"
    assert {c: v["used"] for c, v in manifest["counts"].items()} == {
        "0": 178,
        "1": 182,
        "2": 177,
    }  # every image, none skipped
    assert len(list((out / "images").rglob("*.png"))) == 3 * 10
    table = pq.read_table(out / "distilled.parquet")
    assert table.num_rows == 30 and sorted(set(table.column("label").to_pylist())) == [0, 1, 2]
    names = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    assert names == ["0", "1", "2"]


def test_uploaded_working_dir_excludes_environments_outputs_and_caches(head, distilled):
    """The working dir the digits job ran in: the package Ray's job server took from `--working-dir .` (its URI in
    the job's runtime env, asked of the job server) as the head unpacked it for the job."""
    env, address, temp_dir = head
    ask = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "print(C(sys.argv[1]).get_job_info('distill-digits').runtime_env['working_dir'])"
    )
    uri = subprocess.run(
        [sys.executable, "-c", ask, address], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip"), uri
    (unpacked,) = (temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").glob(
        uri.removeprefix("gcs://").removesuffix(".zip")
    )
    names = {p.name for p in unpacked.iterdir()}
    assert {"d3hr_ray", "jobs", "pyproject.toml"} <= names
    for excluded in (".venv", "d3hr-output", ".git", ".pytest_cache", ".kit"):
        assert excluded not in names
    assert (unpacked / "d3hr_ray" / "distill.py").read_bytes() == (REPO / "d3hr_ray" / "distill.py").read_bytes()


def test_evaluate_through_ray_job_submit(head, distilled, tmp_path):
    out, _ = distilled
    runs = tmp_path / "runs"
    # The teacher is written here, not trained: train_teacher is a Ray Train job like evaluate and is tested
    # in tests/test_evaluate.py; a second Train job through the CLI cost the suite about two minutes.
    torch.manual_seed(0)
    save_teacher(
        OutputDir(str(tmp_path / "teacher")),
        build_student("conv3", 10, 16),
        {
            "arch": "conv3",
            "num_classes": 10,
            "class_names": [str(d) for d in range(10)],
            "resolution": 16,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "test_top1": 0.123,
        },
    )
    submit(
        head,
        "evaluate",
        "python",
        "-m",
        "d3hr_ray.evaluate",
        "--distilled",
        str(out),
        "--test",
        "digits:test",
        "--teacher",
        str(tmp_path / "teacher"),
        "--epochs",
        "2",
        "--eval-every",
        "2",
        "--repeats",
        "1",
        "--output",
        str(tmp_path / "eval"),
        "--storage-path",
        str(runs),
        "--name",
        "student",
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rep = results["per_repeat"]
    assert results["repeats"] == 1 and len(rep) == 1 and rep[0]["train_images"] == 30 and rep[0]["test_images"] == 449
    assert results["teacher_test_top1"] == 0.123  # the teacher.json the test wrote, not a measured accuracy
    # One repeat: its best accuracy is the mean, in percent, and the spread is zero.
    assert results["top1_mean"] == pytest.approx(100 * rep[0]["best_top1"]) and results["top1_std"] == 0.0
    assert (
        results["ipc"] == 10 and rep[0]["train_set"]["classes"] == 3
    )  # per class of the set, not of the 10-class teacher
