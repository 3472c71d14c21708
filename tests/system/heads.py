"""A Ray head of a system test's own: `ray start --head --block` on free ports, its own temp dir, stopped by process id.

Shared by test_submit.py (a head with the dashboard and job server) and test_autoscaler.py (a head whose autoscaler
launches fake nodes). Never `ray stop`: it stops every Ray instance on the machine, other jobs' too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.conftest import free_ports

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_ATTEMPTS = 3  # `ray start` tries before the module fails (a starved CPU can miss the raylet's 30 s window)


def processes() -> dict[int, tuple[int, str]]:
    """Every process of this machine: pid -> (parent pid, command line), from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while being read
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) state": comm may hold spaces
        out[int(entry.name)] = (ppid, cmdline)
    return out


def tree(root: int) -> list[int]:
    """`root` and every process under it (Ray's workers have process groups of their own: killpg misses them)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill(pids: list[int]) -> None:
    """SIGKILL each of `pids` that still runs."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Head:
    """One `ray start --head --block` process; `address` is its GCS (host:port), `log` its output.

    Args:
        log: where the process's stdout and stderr go.
        temp_dir: Ray's temp dir, short (Ray's socket paths must stay under 107 characters).
        env: the process's environment.
        num_cpus: the head's logical CPUs (no GPUs).
        dashboard: start the dashboard (it hosts the job server) on 127.0.0.1; `dashboard_url` then reaches it.
        extra: more `ray start` flags, made from the GCS address the head will have (an autoscaling config that
            names it, a system config).
    """

    def __init__(
        self,
        log: Path,
        temp_dir: Path,
        env: dict[str, str],
        *,
        num_cpus: int,
        dashboard: bool,
        extra: Callable[[str], Sequence[str]] = lambda address: (),
    ):
        gcs, dash, client, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = free_ports(9)
        self.address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self.log, self.temp_dir = log, temp_dir
        cmd = [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            *(["--dashboard-host=127.0.0.1"] if dashboard else []),
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            *extra(self.address),
        ]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def runtime_started(self) -> bool:
        """Whether `ray start` has printed that the runtime started (the raylet registered with the GCS)."""
        return "Ray runtime started" in self.log.read_text(errors="replace")

    def gave_up(self) -> bool:
        """Whether the `ray start` process has ended (on a starved CPU, after missing a start-up window)."""
        return self.proc.poll() is not None

    def stop(self) -> None:
        """SIGTERM the head's process group, wait 3 s, then SIGKILL whatever is left under it (workers and fake nodes
        included: Ray drains the node on SIGTERM, which took 34 s on 2 cores, for nothing in a test); its temp dir
        goes too."""
        pids = tree(self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        kill(sorted(set(pids + tree(self.proc.pid))))
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(make: Callable[[int], Head], ready: Callable[[Head], bool] = lambda head: True) -> Head:
    """A head that is up: `make(attempt)` starts one, up once `ray start` printed that the runtime started and
    `ready(head)` holds, within 300 s. One that gave up (or did not come up) is stopped and another started,
    HEAD_ATTEMPTS in all, as a user would; then the test fails with the last log's tail."""
    for attempt in range(HEAD_ATTEMPTS):
        head = make(attempt)
        deadline = time.time() + 300
        while not head.gave_up() and time.time() < deadline:
            if head.runtime_started() and ready(head):
                return head
            time.sleep(1)
        head.stop()
    raise AssertionError(f"the Ray head did not start in {HEAD_ATTEMPTS} attempts:\n{head.log.read_text()[-3000:]}")
