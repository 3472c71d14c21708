"""Shared fixtures: tiny random-weight DiT pipelines and their float64 twins for reference maths."""

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d3hr_ray.models.build import build_pipeline
from d3hr_ray.training.harness import use_train_v2

use_train_v2()  # as every job's entry point does, before anything imports ray.train


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


def start_local_ray():
    """A new local Ray instance (4 logical CPUs); returns the `ray` module.

    address='local': a new instance even when another Ray runs on this machine (a plain init() joins the
    latest one started, e.g. a developer's `ray start` head, and fails on num_cpus).
    """
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module; test_distill overrides it to add S3 settings."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1, in its own process; yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


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
