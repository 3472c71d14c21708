"""A worker node lost mid-inversion (a spot reclaim) costs only its in-flight work: the statistics are unchanged.

A real multi-node Ray cluster in one machine (`ray.cluster_utils.Cluster`): a head with no CPUs and two
2-CPU worker nodes (a model actor takes 1, read tasks take half a CPU). The job runs in its own
process; once the first shards are finished, the test removes a worker node that runs a model actor (ungracefully, as a reclaimed instance disappears).
"""

import json
import os
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

# Node death noticed in ~1.5 s instead of Ray's default ~20-30 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
FLAGS = ["--classes", "0,1", "--steps", "10", "--inversion-step", "3", "--shard-size", "20", "--batch-size", "10",
         "--max-actors", "2", "--encode", "sample", "--stats-only"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    import ray

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS})
    workers = [c.add_node(num_cpus=2), c.add_node(num_cpus=2)]
    c.wait_for_nodes()
    ray.init(address=c.address)  # the test watches the nodes' free CPUs; the jobs run in their own processes
    yield c, workers
    ray.shutdown()
    c.shutdown()


def hosts_model_actor(node) -> bool:
    """Whether a live encode+invert actor of the job runs on `node`."""
    from ray._private.state import actors  # the GCS actor table: no public per-node view without the dashboard

    return any("EncodeInvertStats" in (a.get("ActorClassName") or "") and a.get("State") == "ALIVE"
               and (a.get("Address") or {}).get("NodeID") == node.node_id for a in actors().values())


def job(cluster_address: str, out, wait: bool = True):
    env = dict(os.environ, RAY_ADDRESS=cluster_address)
    cmd = [sys.executable, "-m", "d3hr_ray.distill", *FLAGS, "--output", str(out)]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_losing_a_worker_node_mid_inversion_leaves_the_statistics_unchanged(cluster, tmp_path):
    c, workers = cluster
    undisturbed = job(c.address, tmp_path / "a")
    assert undisturbed.returncode == 0, undisturbed.stderr[-3000:]

    proc = job(c.address, tmp_path / "b", wait=False)
    shards = tmp_path / "b" / "_state" / "shards"
    deadline = time.time() + 300
    victim = None
    while victim is None:
        assert proc.poll() is None and time.time() < deadline, "the job ended or stalled before a node could be removed"
        if len(list(shards.glob("*.safetensors"))) >= 2:
            victim = next((w for w in workers if hosts_model_actor(w)), None)
        time.sleep(0.05)
    finished_before = len(list(shards.glob("*.safetensors")))
    c.remove_node(victim, allow_graceful=False)  # the node and the model actor(s) on it are gone, mid-batch
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]

    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    total = m["resume"]["shards"]["total"]
    assert finished_before < total, "the node must be lost mid-inversion"
    assert m["status"] == "complete" and m["resume"]["shards"]["computed"] == total
    a, b = load_file(tmp_path / "a" / "stats.safetensors"), load_file(tmp_path / "b" / "stats.safetensors")
    for key in ("count", "mean", "var"):
        assert a[key].equal(b[key]), key  # bit for bit: each batch's result is a pure function of its input
    assert (tmp_path / "a" / "stats.safetensors").read_bytes() == (tmp_path / "b" / "stats.safetensors").read_bytes()
