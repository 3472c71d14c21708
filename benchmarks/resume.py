"""What a kill costs: a full distill run vs a rerun after SIGKILLing the job at a fraction of its time.

Starts one local Ray instance; every job is `python -m d3hr_ray.distill` in its own process group,
joining it through RAY_ADDRESS (as under `ray job submit`). Three runs of the same command:
  1. uninterrupted, into output A: its wall time T;
  2. into output B, SIGKILLed (the whole process group) at --kill-at x T;
  3. the same command on B again: its wall time, the work it reused, and whether its outputs equal A's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

_COMPARED = ("stats.safetensors", "latents.safetensors", "distilled.parquet", "grid.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kill-at", type=float, default=0.75, help="fraction of the full run's time at which the job is killed"
    )
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument(
        "job_flags",
        nargs=argparse.REMAINDER,
        help="flags for the job after '--' (default: digits, 20 steps, K = 12, IPC 10, m = 20,000, shards of 100)",
    )


_DEFAULT_FLAGS = [
    "--steps",
    "20",
    "--inversion-step",
    "12",
    "--ipc",
    "10",
    "--candidates",
    "20000",
    "--shard-size",
    "100",
    "--encode",
    "mean",
]


def _job(env: dict, flags: list[str], out: Path, kill_after: float | None = None) -> tuple[float, int]:
    """(wall seconds, return code) of one job; SIGKILLed after `kill_after` seconds when given."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "d3hr_ray.distill", *flags, "--output", str(out)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.perf_counter() - t
    if kill_after is None and proc.returncode != 0:
        raise RuntimeError(f"the job failed: {proc.stderr.read()[-2000:]}")
    return wall, proc.returncode


def run(args: argparse.Namespace) -> int:
    flags = [f for f in args.job_flags if f != "--"] or _DEFAULT_FLAGS
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            a, b = Path(tmp) / "a", Path(tmp) / "b"
            full, _ = _job(env, flags, a)
            killed_at, code = _job(env, flags, b, kill_after=args.kill_at * full)
            shards_then = len(list((b / "_state" / "shards").glob("*.safetensors")))
            classes_then = len(list((b / "_state" / "classes").glob("*.safetensors")))
            rerun, _ = _job(env, flags, b)
            m = json.loads((b / "manifest.json").read_text())
            same = all((a / f).read_bytes() == (b / f).read_bytes() for f in _COMPARED)
    finally:
        ray.shutdown()
    r = m["resume"]
    print(f"# resume benchmark: job flags {' '.join(flags)}; ray {ray.__version__}, {os.cpu_count()} CPUs")
    print("| run | seconds | fraction of the full run | shards reused / computed | classes reused / computed |")
    print("|---|---|---|---|---|")
    print(f"| full run | {full:.1f} | 1.00 | | |")
    print(
        f"| killed at {args.kill_at:.0%} (exit {code}) | {killed_at:.1f} | {killed_at / full:.2f} | {shards_then} "
        f"finished | {classes_then} finished |"
    )
    print(
        f"| rerun after the kill | {rerun:.1f} | {rerun / full:.2f} | {r['shards']['reused']} / "
        f"{r['shards']['computed']} "
        f"| {r['classes']['reused']} / {r['classes']['computed']} |"
    )
    print(f"outputs of the resumed run equal the uninterrupted run's ({', '.join(_COMPARED)}): {same}")
    print(f"killed + rerun = {(killed_at + rerun) / full:.2f} x a full run")
    return 0 if same else 1
