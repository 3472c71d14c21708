"""Shared fixtures: tiny random-weight DiT pipelines and their float64 twins for reference maths."""

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from d3hr_ray.models.build import build_pipeline
from d3hr_ray.storage.local_s3 import local_s3_server
from d3hr_ray.training.harness import use_train_v2
from tests.cifar_slice import CIFAR, CLASSES, PER_CLASS, job

use_train_v2()  # as every job's entry point does, before anything imports ray.train


# -- the two lanes: `make test-fast` runs `pytest -m "not slow"`, `make test` everything -----------------------------
# slow: every test that starts Ray. A test is slow when it asks for the shared local Ray (`ray_local`, which
# first_run and digits_teacher ask for), when it lives in tests/system/ (a head, a cluster, job processes), or
# when it is marked by hand (@pytest.mark.slow: a long run that starts no Ray).
SYSTEM = Path(__file__).parent / "system"
FAST_LANE_RAY = pytest.StashKey[Path]()


# Modules that shut the shared local Ray down for a cluster of their own (test_autoscaler's head) run after every
# other module, so that the shared Ray starts once a session (a start, its services and its warm task workers cost a
# 2-core machine 20-30 s of CPU); within each group the order stays pytest's.
OWN_CLUSTER = {SYSTEM / "test_autoscaler.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) or SYSTEM in item.path.parents:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path in OWN_CLUSTER)  # stable: only that module moves, whole


def pytest_configure(config: pytest.Config) -> None:
    """In a session that leaves the slow tests out, Ray's temp dir (RAY_TMPDIR, inherited by job processes) is
    a fresh folder: a Ray started anyway (in this process or a child) leaves its session there, and
    pytest_sessionfinish fails the lane, naming the folder. No hand-kept list of Ray-starting tests to forget."""
    if "not slow" in (config.option.markexpr or ""):
        folder = Path(tempfile.mkdtemp(prefix="d3hr-fast-lane-"))
        config.stash[FAST_LANE_RAY] = folder
        os.environ["RAY_TMPDIR"] = str(folder)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    folder = session.config.stash.get(FAST_LANE_RAY, None)
    if folder is None:
        return
    started = sorted(p.name for p in (folder / "ray").glob("session_*") if p.name != "session_latest")
    if started:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        session.config.get_terminal_writer().line(
            f"\nerror: the fast lane started Ray ({folder / 'ray'}: {', '.join(started)}); a test that starts Ray must "
            "ask for ray_local, live in tests/system/ or be marked slow (tests/conftest.py)"
        )
    else:
        shutil.rmtree(folder, ignore_errors=True)


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (bound to port 0 together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def tiny_pipe():
    """A float32 DiT pipeline: 10 classes, R = 8, latents (4, 4, 4), learned sigma, scaling 0.7."""
    return build_pipeline(dit="tiny", vae="tiny", num_classes=10, seed=0)


@pytest.fixture(scope="session")
def ref_models(tiny_pipe):
    """float64 copies of the transformer and VAE, for the tests' independent computations."""
    return copy.deepcopy(tiny_pipe.transformer).double(), copy.deepcopy(tiny_pipe.vae).double()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """|x - ref| / |ref| in float64 (Frobenius norms)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def start_local_ray(env: dict[str, str] | None = None):
    """A new local Ray instance (4 logical CPUs) whose processes see `env` too; returns the `ray` module.

    address='local': a new instance even when another Ray runs on this machine (a plain init() joins the
    latest one started, e.g. a developer's `ray start` head, and fails on num_cpus). The raylet inherits
    the driver's environment at start, so `env` is set around the start and restored after: the workers
    see it, this process does not.
    """
    import ray

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ray


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """The local Ray instance of every module that runs jobs in this process: started by the first such module
    and kept for the next (a Ray start costs seconds); a module that needs a cluster of its own
    (tests/system/test_autoscaler.py) shuts it down, and the next module starts it again. Its workers see
    moto's S3 server and test credentials."""
    import ray

    if not ray.is_initialized():
        start_local_ray({**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server})
    return ray


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1, in its own process; yields its endpoint URL."""
    with local_s3_server() as url:
        yield url


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class BackgroundJob:
    """`python -m d3hr_ray.distill` in its own process group (as `ray job submit` runs it), output to a file.

    Never an unread pipe: a job that fills a 64 KiB pipe nobody reads blocks on its next log line.
    Use as a context manager: the whole process group is SIGKILLed on the way out if still running,
    so a failed assertion cannot leave a job writing into the folder the next step inspects.
    """

    def __init__(self, flags: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "d3hr_ray.distill", *flags],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        """The last n characters of the job's stdout and stderr."""
        return self.log.read_text(errors="replace")[-n:]

    def kill(self) -> None:
        """SIGKILL the job's process group (the driver and anything it started), then reap it."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float = 600) -> int:
        """Wait for the job to end; returns its exit code."""
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> "BackgroundJob":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


# -- the distill job's fixtures: a tiny DiT and a slice of real CIFAR-10 (tests/cifar_slice.py) --------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny 4-class DiT whose id2label names the CIFAR folders (R = 8: CIFAR's 32 px are resized)."""
    folder = tmp_path_factory.mktemp("model") / "dit"
    build_pipeline(num_classes=4, class_names=CLASSES, seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """An ImageFolder of symlinks to real CIFAR-10 JPEGs, plus one corrupt file and one stray file."""
    root = tmp_path_factory.mktemp("data") / "cifar-slice"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / c / f"{i:04d}.jpg").symlink_to(CIFAR / c / f"{i:04d}.jpg")
    (root / "bird" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "README.txt").write_text("stray file at the root")
    return root


@pytest.fixture(scope="session")
def computed_once():
    """A session-wide cache of results that module-scoped fixtures compute once (their Ray is module-scoped)."""
    return {}


@pytest.fixture(scope="module")
def first_run(ray_local, model_dir, image_root, tmp_path_factory, computed_once):
    """The distill job on the CIFAR slice (--encode mean, IPC 3, m = 500, K = 6 of 10), logged to MLflow in the
    folder's parent's mlruns/: (manifest, output folder)."""
    if "first_run" in computed_once:
        return computed_once["first_run"]
    out = tmp_path_factory.mktemp("runs")
    computed_once["first_run"] = job(
        out,
        "a",
        "--data",
        str(image_root),
        "--model",
        str(model_dir),
        "--encode",
        "mean",
        "--ipc",
        "3",
        "--candidates",
        "500",
        "--batch-size",
        "4",
        "--max-actors",
        "1",
        "--steps",
        "10",
        "--inversion-step",
        "6",
        "--mlflow",
        f"file://{out / 'mlruns'}",
    )
    return computed_once["first_run"]


@pytest.fixture(scope="module")
def digits_teacher(ray_local, tmp_path_factory, computed_once):
    """A conv3 teacher of digits:train at 16 px, 3 epochs, both sets streamed from Ray Data shards (--cache-gb 0:
    the path of a data set too big to cache), logged to MLflow: train_teacher's result dict, plus "mlflow" (the
    store). Shared by evaluate's tests."""
    from d3hr_ray.flags import config_from_args
    from d3hr_ray.train_teacher import TeacherConfig
    from d3hr_ray.train_teacher import run as train_teacher

    if "digits_teacher" in computed_once:
        return computed_once["digits_teacher"]
    root = tmp_path_factory.mktemp("teacher")
    flags = [
        "--data",
        "digits:train",
        "--test",
        "digits:test",
        "--resolution",
        "16",
        "--epochs",
        "3",
        "--eval-every",
        "3",
        "--cache-gb",
        "0",
        "--output",
        str(root / "t"),
        "--storage-path",
        str(root / "runs"),
        "--name",
        "teacher",
        "--mlflow",
        f"file://{root / 'mlruns'}",
    ]
    result = train_teacher(config_from_args(TeacherConfig, flags))
    computed_once["digits_teacher"] = dict(result, mlflow=f"file://{root / 'mlruns'}")
    return computed_once["digits_teacher"]
