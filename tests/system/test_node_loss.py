"""Elastic clusters: a worker node lost mid-inversion (a spot reclaim) costs only its in-flight work, and the
node that replaces it mid-inversion is used; the statistics are those of the same images computed here in one
process with the core functions (every count exact, means and variances to float32 rounding).

A real multi-node Ray cluster in one machine (`ray.cluster_utils.Cluster`): a head with no CPUs and two
2-CPU worker nodes. Each worker declares two `model_slot`s and the jobs run with
`--actor-resources model_slot=1`, so a node holds exactly two model actors whatever else runs on it. Without
that, the two actors lost with a node were restarted wherever half a CPU was free first, and the node left
had room once the read tasks ended: the replacement went unused in about one run in six. The jobs run in
their own processes. Once the first shards are finished, the test removes a worker node that runs a model
actor (ungracefully, as a reclaimed instance disappears) and adds a fresh one: the node left is full, so
the lost actors can only come back on the new node. One disturbed run for both events (loss, then the
replacement) instead of one each: each run of this module costs over a minute.
"""

import json
import os
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import BackgroundJob

# Node death noticed in ~1.5 s instead of Ray's default ~20-30 s.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
# 537 images in 27 shards, K = 8: long enough on the one node left after the loss for the replacement to
# be used (the lost actors wait for a free model_slot, which only the new node has).
FLAGS = [
    "--classes",
    "0,1,2",
    "--steps",
    "20",
    "--inversion-step",
    "8",
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
WORKER = {"num_cpus": 2, "resources": {"model_slot": 2}}  # two model actors a node


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the tests' shared local Ray (conftest.py runs this module after those that use it)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS})
    workers = [c.add_node(**WORKER), c.add_node(**WORKER)]
    c.wait_for_nodes()
    ray.init(address=c.address)  # the test watches the GCS actor table; the jobs run in their own processes
    yield c, workers  # the tests keep `workers` to the live worker nodes
    ray.shutdown()
    c.shutdown()


def model_actors() -> dict[str, dict]:
    """The encode+invert actors in the GCS actor table (alive or dead): id -> entry (State, Address.NodeID)."""
    from ray._private.state import actors  # the GCS actor table: no public per-node view without the dashboard

    return {k: a for k, a in actors().items() if "EncodeInvertStats" in (a.get("ActorClassName") or "")}


def hosts_model_actor(node) -> bool:
    """Whether a live encode+invert actor of the job runs on `node`."""
    return any(
        a.get("State") == "ALIVE" and (a.get("Address") or {}).get("NodeID") == node.node_id
        for a in model_actors().values()
    )


def background_job(cluster_address: str, out, log, extra: tuple[str, ...] = ()) -> BackgroundJob:
    """The job on the cluster in its own process (killed when its `with` block ends), output to `log`."""
    return BackgroundJob([*FLAGS, *extra, "--output", str(out)], dict(os.environ, RAY_ADDRESS=cluster_address), log)


@pytest.fixture(scope="module")
def reference():
    """(count, mean, var) per class of the 537 images of digits 0-2, computed here: the job's preprocessing of each
    image, its VAE noise keyed by (seed, key), encode and invert to K = 8 of 20 in one batch, numpy's statistics."""
    import numpy as np
    import torch

    from d3hr_ray import encode, invert, load_pipeline
    from d3hr_ray.data.digits import digits_rgb
    from d3hr_ray.data.preprocess import to_pixels
    from d3hr_ray.seeding import generator

    pipe = load_pipeline("builtin:digits")
    r = pipe.transformer.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    rgb, target = digits_rgb()
    idx = np.flatnonzero(np.isin(target, [0, 1, 2]))
    x = torch.from_numpy(np.stack([to_pixels(rgb[i], r) for i in idx]).astype(np.float32) / 127.5 - 1.0)
    gens = [generator(0, "encode", f"digits/{i}") for i in idx]
    with torch.no_grad():
        zk = invert(
            pipe,
            encode(pipe, x, mode="sample", generator=gens),
            torch.from_numpy(target[idx]),
            steps=20,
            inversion_step=8,
        )
    z = zk.flatten(1).double().numpy()
    return {
        c: (int((target[idx] == c).sum()), z[target[idx] == c].mean(0), z[target[idx] == c].var(0, ddof=1))
        for c in (0, 1, 2)
    }


def assert_same_statistics(reference, out) -> None:
    import numpy as np

    stats = load_file(out / "stats.safetensors")
    for c, (count, mean, var) in reference.items():
        assert int(stats["count"][c]) == count  # nothing lost, nothing counted twice
        scale = np.abs(mean).max() + np.sqrt(var).max()
        np.testing.assert_allclose(stats["mean"][c].double().numpy(), mean, atol=1e-5 * scale)
        np.testing.assert_allclose(stats["var"][c].double().numpy(), var, atol=2e-5 * scale * np.sqrt(var).max())


def test_a_node_lost_and_its_replacement_joining_mid_inversion_leave_the_statistics_unchanged(
    cluster, reference, tmp_path
):
    """A spot reclaim and its replacement in one run: once shards are finished, a worker node that runs a model
    actor is removed without grace, then a fresh node joins. With --max-actors 4 the pool starts with four
    actors, two a node (the model_slots); the two lost with the node have no slot on the node left, so they
    must come back on the node that joined."""
    c, workers = cluster
    before = set(model_actors())
    blocks = tmp_path / "b" / "_state" / "blocks"
    with background_job(c.address, tmp_path / "b", tmp_path / "b.log", extra=("--max-actors", "4")) as run:
        deadline = time.time() + 900
        victim = None
        while victim is None:
            assert run.running() and time.time() < deadline, (
                f"the job ended or stalled before a node could be removed:\n{run.tail()}"
            )
            if len(list(blocks.glob("*.safetensors"))) >= 2:
                victim = next((w for w in workers if hosts_model_actor(w)), None)
            time.sleep(0.05)
        lost_at = len(list(blocks.glob("*.safetensors")))
        c.remove_node(victim, allow_graceful=False)  # the node and the model actor(s) on it are gone, mid-batch
        workers.remove(victim)
        joined = c.add_node(**WORKER)  # the replacement
        workers.append(joined)
        joined_at = len(list(blocks.glob("*.safetensors")))
        assert run.wait(timeout=600) == 0, run.tail()

    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    total = m["resume"]["shards"]["total"]
    block = json.loads((tmp_path / "b" / "_state" / "run.json").read_text())["block"]
    assert lost_at < -(-total // block) and joined_at < -(-total // block), (
        "the node must be lost and its replacement join mid-inversion"
    )
    assert m["status"] == "complete" and m["resume"]["shards"]["computed"] == total
    nodes = {(a.get("Address") or {}).get("NodeID") for k, a in model_actors().items() if k not in before}
    assert joined.node_id in nodes, "the lost model actors must come back on the node that joined"
    assert_same_statistics(reference, tmp_path / "b")
