"""Ray's autoscaler in the loop: the distill job on a head whose worker nodes only the autoscaler starts and stops.

Ray's fake multi-node provider (cluster/fake-multinode.yaml: provider `fake_multinode`) runs the v1 autoscaler
on one machine: each "node" it launches is a raylet of its own, with a node id it assigns (ffff...00001, 00002,
... in launch order). The head (`ray start --head --block`, RAY_FAKE_CLUSTER=1, its own temp dir and free ports)
has 1 CPU and runs the driver and the read tasks; the worker type has 1 CPU and one `model_slot`, 0 to 2 nodes.
The job asks `--actor-resources model_slot=1`, so its model actors can only run on nodes the autoscaler
starts (the head declares no slot), one a node, as a spot GPU group scaling from zero serves its GPU actors.
A worker type declaring a GPU is left out: the job's GPU path (`--num-gpus`) moves the model to CUDA, which
a fake node on a CPU machine does not have, and the scheduling it would exercise is the same as the slot's.

One run of the job (--stats-only, digits 0 and 1: 360 images, 18 shards) covers the four things:
1. its model actors run on nodes the autoscaler launched (GCS actor table against the autoscaler's report);
2. once every worker's slot holds a live model actor, the test kills one such node's raylet and everything under
   it by process id, as a spot reclaim ends an instance without grace; the autoscaler terminates the dead node
   and launches another, and a model actor runs on a node that joined after the kill (GCS actor table);
3. the statistics equal those of the same 360 images computed here with the core functions (every count exact,
   means and variances to float32 rounding), and the manifest counts every shard computed;
4. once the job is done, the idle worker nodes go away (idle_timeout_minutes 0.2) within a bounded wait.

Never `ray stop` (it stops every Ray on the machine) nor `ray.cluster_utils.AutoscalingCluster` (its start()
runs `ray stop --force`, and it reads an example.yaml the Ray 2.60 wheel does not ship): the head and every
process under it, the fake nodes included, are stopped by process id.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from ray._private import ray_constants
from ray._private.state import actors
from ray.core.generated.common_pb2 import NodeDeathInfo
from ray.experimental.internal_kv import _internal_kv_get
from safetensors.torch import load_file

from d3hr_ray import encode, invert, load_pipeline
from d3hr_ray.data.digits import digits_rgb
from d3hr_ray.data.preprocess import to_pixels
from d3hr_ray.seeding import generator
from tests.conftest import BackgroundJob
from tests.system.heads import Head, kill, processes, start_head, tree

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "fake-multinode.yaml"
HEAD_TYPE, WORKER_TYPE = "ray.head.default", "cpu_worker"
CLASSES = (0, 1)
STEPS, INVERSION_STEP = 20, 8
FLAGS = [
    "--classes",
    ",".join(map(str, CLASSES)),
    "--steps",
    str(STEPS),
    "--inversion-step",
    str(INVERSION_STEP),
    "--shard-size",
    "20",
    "--batch-size",
    "10",
    "--max-actors",
    "2",
    "--encode",
    "sample",
    "--stats-only",
    "--actor-resources",
    "model_slot=1",
]
# Node death noticed by the GCS in ~1.5 s instead of Ray's default ~20-30 s.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
HEAD_ENV = {
    "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
    "RAY_enable_autoscaler_v2": "0",  # v1: the v2 autoscaler fills defaults from the example.yaml the wheel lacks
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # Ray's default is 5
    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10",  # a node whose raylet went silent is replaced after 10 s, not 30 s
    "RAY_AUTH_MODE": "disabled",  # 127.0.0.1 only; token auth is test_submit's
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray Data's own cluster autoscaler asks Ray's for one more node of each shape once the cluster is half busy; on a
# 1-CPU head the read tasks alone trip it, and the extra 1-CPU node it gets is a worker with a free model_slot, where
# a lost model actor comes back without the autoscaler replacing anything. Off (a utilization above 100 % never
# comes), the only demand the autoscaler sees is the model actors'.
JOB_ENV = {
    f"RAY_DATA_DEFAULT_CLUSTER_SCALING_UP_{r}_UTIL_THRESHOLD": "2"
    for r in ("CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY")
}
WAIT_ACTOR_S = 600  # from the job's start to a model actor up on an autoscaled node (node start + model load)
WAIT_JOB_S = 600
WAIT_SCALE_DOWN_S = 180  # idle timeout 12 s + the autoscaler's 1 s rounds; generous for a loaded 2-core machine


def _raylet_pid(node_id: str, temp_dir: Path) -> int:
    """The raylet of fake node `node_id` of this test's head (its command line names both)."""
    pids = [
        pid
        for pid, (_, cmd) in processes().items()
        if "raylet/raylet " in cmd and f"--node_id={node_id}" in cmd and str(temp_dir) in cmd
    ]
    assert len(pids) == 1, f"expected one raylet for node {node_id} under {temp_dir}, found {pids}"
    return pids[0]


# -- the head ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The autoscaling head, joined by this process (to read the GCS and the autoscaler's report)."""
    root = tmp_path_factory.mktemp("autoscaler")
    ray.shutdown()  # the tests' shared local Ray (conftest.py runs this module after those that use it)

    config = yaml.safe_load(CONFIG.read_text())

    def make(attempt: int) -> Head:
        def flags(address: str) -> tuple[str, ...]:
            config["provider"]["gcs_address"] = address  # the fake nodes join this head, not <ip>:6379
            config_path = root / f"autoscaling-{attempt}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            system = json.dumps(FAST_HEALTH_CHECKS, separators=(",", ":"))
            return f"--autoscaling-config={config_path}", f"--system-config={system}"

        temp_dir = Path("/tmp") / f"ras{os.getpid()}-{attempt}"  # Ray's socket paths must stay under 107 characters
        env = dict(os.environ, **HEAD_ENV, RAY_TMPDIR=str(temp_dir))
        env.pop("RAY_ADDRESS", None)
        cpus = config["available_node_types"][HEAD_TYPE]["resources"]["CPU"]
        return Head(root / f"head-{attempt}.log", temp_dir, env, num_cpus=cpus, dashboard=False, extra=flags)

    started = None
    try:
        started = start_head(make)
        ray.init(address=started.address, log_to_driver=False)
        yield started
    finally:
        ray.shutdown()
        if started:
            started.stop()
            left = [pid for pid, (_, cmd) in processes().items() if str(started.temp_dir) in cmd]
            assert not left, f"processes of the test's head outlived it: {left}"


# -- the cluster's state, from the GCS ---------------------------------------------------------------------------


def model_actors() -> dict[str, dict]:
    """The encode+invert actors in the GCS actor table (alive or dead): id -> entry (State, Address.NodeID)."""
    return {k: a for k, a in actors().items() if "EncodeInvertStats" in (a.get("ActorClassName") or "")}


def actor_node(a: dict) -> str | None:
    return (a.get("Address") or {}).get("NodeID")


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def autoscaler_nodes() -> dict[str, str]:
    """The autoscaler's own view (its last report in the GCS): node id -> node type, for the nodes it runs."""
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw)["autoscaler_report"]["node_type_mapping"] if raw else {}


# -- the reference -----------------------------------------------------------------------------------------------


def reference_statistics() -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    """(count, mean, var) per class of the 360 images of digits 0 and 1, computed here: the job's preprocessing of
    each image, its VAE noise keyed by (seed, key), encode and invert to K = 8 of 20 in one batch, numpy's
    statistics. mean, var: (C*H*W,) float64."""
    pipe = load_pipeline("builtin:digits")
    r = pipe.transformer.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    rgb, target = digits_rgb()
    idx = np.flatnonzero(np.isin(target, CLASSES))
    x = torch.from_numpy(np.stack([to_pixels(rgb[i], r) for i in idx]).astype(np.float32) / 127.5 - 1.0)
    gens = [generator(0, "encode", f"digits/{i}") for i in idx]
    with torch.no_grad():
        zk = invert(
            pipe,
            encode(pipe, x, mode="sample", generator=gens),
            torch.from_numpy(target[idx]),
            steps=STEPS,
            inversion_step=INVERSION_STEP,
        )
    z = zk.flatten(1).double().numpy()  # (N, C*H*W) float64
    y = target[idx]
    return {c: (int((y == c).sum()), z[y == c].mean(0), z[y == c].var(0, ddof=1)) for c in CLASSES}


# -- the test ----------------------------------------------------------------------------------------------------


def test_autoscaled_nodes_serve_the_job_survive_a_reclaim_and_scale_down(head, tmp_path):
    """The job's model actors come from nodes the autoscaler launches; one such node is killed without grace
    while its model actor is up; the autoscaler replaces it and the job ends with the reference statistics; then
    the idle workers are scaled down."""
    out = tmp_path / "out"
    env = dict(os.environ, **JOB_ENV, RAY_ADDRESS=head.address, RAY_AUTH_MODE="disabled")
    launched: set[str] = set()  # worker nodes seen in the autoscaler's reports
    workers_seen: set[str] = set()  # worker nodes seen alive in the GCS

    def look() -> None:
        launched.update(n for n, t in autoscaler_nodes().items() if t == WORKER_TYPE)
        workers_seen.update(alive_nodes() - {head_id})

    head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert alive_nodes() == {head_id}, "the cluster must start with the head alone (min_workers 0)"
    with BackgroundJob([*FLAGS, "--output", str(out)], env, tmp_path / "job.log") as run, ThreadPoolExecutor(1) as pool:
        # The reference meanwhile (torch frees the GIL): the job spends most of its time waiting for nodes.
        reference = pool.submit(reference_statistics)
        # 1. Model actors up on the nodes the autoscaler launched, every worker's slot taken: no free slot is left
        # where a lost actor could come back, so coming back needs a node launched after the loss.
        deadline = time.time() + WAIT_ACTOR_S
        while True:
            assert run.running(), f"the job ended before its model actors were up on autoscaled nodes:\n{run.tail()}"
            assert time.time() < deadline, (
                f"no model actor up on every autoscaled node after {WAIT_ACTOR_S} s (autoscaler's nodes: "
                f"{autoscaler_nodes()}):\n{run.tail()}"
            )
            look()
            alive_at_kill = alive_nodes()
            hosts = sorted({actor_node(a) for a in model_actors().values() if a.get("State") == "ALIVE"})
            if hosts and set(hosts) == alive_at_kill - {head_id}:
                break
            time.sleep(0.2)
        victim = hosts[0]
        look()
        assert victim in launched, f"the model actor's node {victim} is not one the autoscaler launched"

        # 2. A spot reclaim: the victim's raylet and everything under it (its model actor, agents) SIGKILLed at once.
        assert not (out / "stats.safetensors").exists(), "the job must still be inverting when the node is lost"
        kill(tree(_raylet_pid(victim, head.temp_dir)))
        deadline = time.time() + WAIT_JOB_S
        while run.running():
            assert time.time() < deadline, f"the job did not end in {WAIT_JOB_S} s after the node loss:\n{run.tail()}"
            look()
            time.sleep(0.5)
        assert run.wait() == 0, run.tail()
        look()

    # The actors ran only on autoscaled nodes, and one on a node that joined after the loss.
    hosts = {actor_node(a) for a in model_actors().values()}
    assert hosts <= launched, f"model actors ran on nodes the autoscaler did not launch: {hosts - launched}"
    assert hosts - alive_at_kill, f"no model actor ran on a node launched after the loss (hosts {hosts})"
    assert victim not in alive_nodes(), "the killed node must stay dead"

    # 3. The statistics of the 360 images, every shard computed once.
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert m["resume"]["shards"]["computed"] == m["resume"]["shards"]["total"] == 18
    stats = load_file(out / "stats.safetensors")
    for c, (count, mean, var) in reference.result().items():
        assert int(stats["count"][c]) == count  # nothing lost, nothing counted twice
        scale = np.abs(mean).max() + np.sqrt(var).max()
        np.testing.assert_allclose(stats["mean"][c].double().numpy(), mean, atol=1e-5 * scale)
        np.testing.assert_allclose(stats["var"][c].double().numpy(), var, atol=2e-5 * scale * np.sqrt(var).max())

    # 4. The idle workers go: the GCS has the head alone and the autoscaler runs no worker.
    deadline = time.time() + WAIT_SCALE_DOWN_S
    while alive_nodes() != {head_id} or set(autoscaler_nodes()) != {head_id}:
        assert time.time() < deadline, (
            f"worker nodes still up {WAIT_SCALE_DOWN_S} s after the job: GCS {alive_nodes() - {head_id}}, "
            f"autoscaler {autoscaler_nodes()}"
        )
        look()
        time.sleep(1)
    # Every worker joined as the autoscaler's; the victim was lost, every other one stopped on purpose (SIGTERM).
    assert workers_seen <= launched, f"nodes joined that the autoscaler did not launch: {workers_seen - launched}"
    deaths = {n["NodeID"]: n["DeathReason"] for n in ray.nodes() if n["NodeID"] in workers_seen}
    assert deaths.pop(victim) == NodeDeathInfo.UNEXPECTED_TERMINATION, "the killed node must count as lost"
    assert set(deaths.values()) == {NodeDeathInfo.EXPECTED_TERMINATION}, f"workers lost, not scaled down: {deaths}"
    print()  # noqa: E501
