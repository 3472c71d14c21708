"""Where the distill job's model actors run: the cluster it joins, the devices and actor counts it uses.

init_ray(verbose)           join RAY_ADDRESS (`ray job submit`, a cluster) or start a local instance; quiet logs
configure_data_context(...) actor restarts; Ray Data's progress bars on a terminal only
plan_resources(cfg)         `Resources` from the cluster and the flags
compile_choice(mode, ...)  whether a stage's actors torch.compile the DiT, and why
actor_pool(actors, start)   Ray Data's autoscaling actor pool for a model stage
on_model_actors(ds, ...)    a dataset through a stage's model actors, compiled or not as compile_choice decides
stats_actors(shards, ...)   no more statistics actors than sub-batches to compute
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.data
from ray.data import DataContext, Dataset

from d3hr_ray.config import DistillConfig
from d3hr_ray.data.listing import Shard
from d3hr_ray.workers.actors import EncodeSpec, GenerateSpec, default_batch_size

# What a model actor is built from (its first constructor argument; `on_model_actors` sets its compile field).
_ActorSpec = EncodeSpec | GenerateSpec

__all__ = [
    "ACTOR_INIT_RETRIES",
    "COMPILE_BREAK_EVEN_IMAGES",
    "CPU_ACTOR_CPUS",
    "READ_CPUS",
    "Resources",
    "actor_pool",
    "compile_choice",
    "configure_data_context",
    "init_ray",
    "on_model_actors",
    "plan_resources",
    "quiet_logs",
    "stats_actors",
]

# CPUs per read task: the streaming repartition's default, so Ray Data fuses the two (docs/distill.md, "The pipeline").
READ_CPUS = 1.0
# Ray CPUs of a CPU model actor (it runs one torch thread; see `plan_resources`).
CPU_ACTOR_CPUS = 0.5
# Consecutive actor-constructor deaths tolerated before the job fails (Ray's default is 0).
ACTOR_INIT_RETRIES = 3
# Ray Data's one warning that its progress bars are off, which this job turns off on purpose (not on a terminal).
_BARS_OFF_LOGGER = "ray.data._internal.progress"


@dataclass(frozen=True)
class Resources:
    """What the model actors get.

    Attributes:
        device, dtype: "cuda" or "cpu"; the model's dtype name.
        num_gpus: GPUs per model actor (0 on CPUs).
        actors: the most model actors per stage; initial_actors: how many a pool starts with (what the cluster holds
            now).
        resources: custom Ray resources per actor (--actor-resources), or None.
        actor_cpus, actor_threads: Ray CPUs and torch threads per actor.
        batch_size: images per encode+invert sub-batch.
    """

    device: str
    dtype: str
    num_gpus: float
    actors: int
    initial_actors: int
    resources: dict[str, float] | None
    actor_cpus: float
    actor_threads: int
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def quiet_logs(verbose: bool = False) -> None:
    """Ray's logs and Ray Data's console at WARNING (INFO with --verbose), in this process: warnings and errors
    still show, and Ray Data's file log (ray-data.log in the session's logs) keeps everything. Quiet hides Ray's
    start-up lines and Ray Data's plans and the progress it logs every few seconds when stdout is not a terminal;
    the job prints its own progress lines (ray.data, imported at the top, has set up its loggers by now)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray").setLevel(level)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(level)
    logging.getLogger(_BARS_OFF_LOGGER).setLevel(logging.NOTSET if verbose else logging.ERROR)


def init_ray(verbose: bool = False) -> None:
    quiet_logs(verbose)
    if not ray.is_initialized():
        # Joins RAY_ADDRESS (set by `ray job submit` and on clusters) or starts a local instance.
        ray.init(
            log_to_driver=True, include_dashboard=False, logging_level=logging.INFO if verbose else logging.WARNING
        )
    quiet_logs(verbose)  # again: ray.init sets the "ray" logger to its logging_level


def configure_data_context(verbose: bool = False, terminal: bool | None = None) -> None:
    """Fault tolerance on purpose: an actor whose constructor dies (e.g. out of memory while loading
    the model) is replaced a few times before the job fails, instead of failing at the first death.

    Ray Data's progress bars only on a terminal (`terminal`: default, whether stdout is one) or with --verbose
    (then, off a terminal, Ray Data logs its progress every few seconds, as it does by default)."""
    ctx = DataContext.get_current()
    if ctx.max_consecutive_actor_init_deaths == 0:  # Ray's default: fail at the first death; -1 (unlimited) is kept
        ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_RETRIES
    ctx.enable_progress_bars = bool(verbose or (sys.stdout.isatty() if terminal is None else terminal))


def plan_resources(cfg: DistillConfig) -> Resources:
    """Devices, dtype and actor counts from the cluster (`ray.cluster_resources()`) and the flags of a DistillConfig.

    CPU model actors: one per core, single-threaded, half a CPU each in Ray's accounts (the other half of
    the cluster is left to read tasks); one thread keeps the statistics identical bit for bit whatever the
    cluster's size, and one actor per core keeps every core on the DiT (docs/performance.md). GPU actors:
    one per GPU. Pools start with what the cluster holds now and grow to --max-actors as nodes join.
    """
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0 and gpus < num_gpus:  # an autoscaling GPU group at 0 nodes (cluster/): its nodes come on demand
        print(
            f"--num-gpus {num_gpus:g}: the Ray cluster has {gpus:g} GPUs now; the model actors wait for GPU nodes "
            "(an autoscaler adds them; on a cluster that has none, stop the job and drop --num-gpus)",
            flush=True,
        )
    if (
        cfg.num_gpus is None and num_gpus == 0
    ):  # auto found no GPU: say so, an autoscaling GPU group looks like this too
        print(
            "no GPUs in the Ray cluster now: the model actors run on CPUs (on a cluster whose GPU nodes an autoscaler "
            "adds on demand, pass --num-gpus 1 and --max-actors)",
            flush=True,
        )
    device = "cuda" if num_gpus > 0 else "cpu"
    fit = max(1, int(gpus // num_gpus)) if num_gpus > 0 else max(1, int(cpus))
    custom = cfg.actor_resource_map
    for name, amount in custom.items():  # --actor-resources: no more actors at start than the nodes declaring them hold
        if (
            total.get(name, 0) < amount
        ):  # an autoscaler may add such a node; a fixed cluster would wait forever, so say it
            print(
                f"--actor-resources {name}={amount:g}: no node in the Ray cluster declares {name!r} yet; the model "
                "actors wait "
                "for one (an autoscaling worker group that declares it, or `ray start --resources`)",
                flush=True,
            )
        fit = max(1, min(fit, int(total.get(name, 0) // amount)))
    return Resources(
        device=device,
        dtype=cfg.dtype or ("bfloat16" if device == "cuda" else "float32"),
        num_gpus=num_gpus,
        actors=cfg.max_actors or fit,
        initial_actors=fit,
        resources=custom or None,
        actor_cpus=1.0 if device == "cuda" else CPU_ACTOR_CPUS,
        actor_threads=1,
        batch_size=cfg.batch_size or default_batch_size(device),
    )


def actor_pool(actors: int, initial: int) -> ray.data.ActorPoolStrategy:
    """An autoscaling actor pool: starts `initial` actors at once, grows to `actors` as nodes join
    (noticed within ~20 s), outlives node loss.

    Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1: an actor that dies
    with its node is restarted on another node (its model loaded again) and its in-flight and queued
    batches are resubmitted to it. A batch's result is a pure function of its input, so a retry
    changes nothing, and the driver receives each batch's result once.
    """
    return ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=max(1, min(initial, actors)))


def stats_actors(shards: list[Shard], batch_size: int, actors: int) -> int:
    """Model actors for the statistics stage: `actors`, but no more than the sub-batches `read_batches` cuts
    from `shards` (at least one per shard). A small job (a few classes, the last shards of a resumed run)
    leaves the rest of the cluster's GPUs alone and loads no model that would get no work."""
    units = sum(max(1, -(-s.inputs // batch_size)) for s in shards)
    return max(1, min(actors, units))


# Images one model actor must process before torch.compile pays for itself, per device type where it was
# measured (docs/performance.md, "GPU", H200, DiT-XL/2 at 256 px: ~100 s of compiling per actor, two shapes,
# against ~12 % less time an image at ~26 images/s). `--compile auto` runs eager on device types not listed.
COMPILE_BREAK_EVEN_IMAGES = {"cuda": 21_000}


def compile_choice(mode: str, device_type: str, images_per_actor: float) -> tuple[bool, str]:
    """Whether a stage's model actors torch.compile the DiT, and why (the line the plan and the job print).

    Args:
        mode: --compile: "auto", "on" or "off".
        device_type: "cuda", "cpu", ...
        images_per_actor: the images each actor of the stage will encode+invert or generate in this run.
    """
    if mode in ("on", "off"):
        return mode == "on", f"--compile {mode}"
    be = COMPILE_BREAK_EVEN_IMAGES.get(device_type)
    if be is None:
        return (
            False,
            f"eager: no measured break-even on {device_type} (measured: {', '.join(COMPILE_BREAK_EVEN_IMAGES)})",
        )
    if images_per_actor > be:
        return True, f"compiled: {images_per_actor:,.0f} images per actor > break-even {be:,} on {device_type}"
    return False, f"eager: {images_per_actor:,.0f} images per actor <= break-even {be:,} on {device_type}"


def on_model_actors(
    ds: Dataset,
    actor: type,
    spec: _ActorSpec,
    resources: Resources,
    actors: int,
    *,
    compile_mode: str,
    images: float,
    log: str,
    extra_args: tuple = (),
) -> Dataset:
    """`ds` through a pool of at most `actors` model actors (`actor(spec, *extra_args)`, one row batch a call), placed
    as `resources` says; the actors torch.compile the DiT when `compile_choice` says so for `images` images in all,
    which the job logs after `log` ("encode+invert: compiled: ...")."""
    compiled, why = compile_choice(compile_mode, resources.device, images / actors)
    print(f"{log}{why}", flush=True)
    return ds.map_batches(
        actor,
        fn_constructor_args=(dataclasses.replace(spec, compile=compiled), *extra_args),
        batch_size=1,
        compute=actor_pool(actors, resources.initial_actors),
        num_gpus=resources.num_gpus,
        num_cpus=resources.actor_cpus,
        resources=resources.resources,
        batch_format="numpy",
    )
