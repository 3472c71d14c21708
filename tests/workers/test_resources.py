"""workers/resources.py: devices, actor counts and pool sizes from a (patched) cluster and the flags."""

from d3hr_ray.config import DistillConfig
from d3hr_ray.flags import config_from_args
from d3hr_ray.workers.resources import COMPILE_BREAK_EVEN_IMAGES, compile_choice


def test_statistics_stage_starts_no_more_actors_than_sub_batches():
    from d3hr_ray.data.listing import Shard
    from d3hr_ray.workers.resources import stats_actors

    runs = [(0, 40), (40, 45), (45, 45)]  # 2 + 1 + 1 (empty) sub-batches of 20
    shards = [Shard(id=i, uri="x", start=a, stop=b) for i, (a, b) in enumerate(runs)]
    assert stats_actors(shards, 20, 8) == 4
    assert stats_actors(shards, 20, 3) == 3
    assert stats_actors(shards[:1], 64, 8) == 1
    assert stats_actors([], 20, 8) == 1


def test_custom_actor_resources_bound_the_pools_start(monkeypatch, capsys):
    """--actor-resources: each model actor asks Ray for them, and a pool starts with no more actors than the
    nodes declaring them hold (a cluster of 8 CPUs with 3 'slot's starts 3 actors needing slot=1)."""
    import ray

    from d3hr_ray.workers.resources import plan_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "slot": 3.0})
    plain = plan_resources(config_from_args(DistillConfig, []))
    assert (plain.initial_actors, plain.actors, plain.resources) == (8, 8, None)
    slot = plan_resources(config_from_args(DistillConfig, ["--actor-resources", "slot=1"]))
    assert (slot.initial_actors, slot.actors, slot.resources) == (3, 3, {"slot": 1.0})
    grow = plan_resources(
        config_from_args(DistillConfig, ["--actor-resources", "slot=1", "--max-actors", "5"])
    )  # grows onto nodes that join
    assert (grow.initial_actors, grow.actors) == (3, 5)
    assert plan_resources(config_from_args(DistillConfig, ["--actor-resources", "slot=2"])).initial_actors == 1
    capsys.readouterr()
    missing = plan_resources(config_from_args(DistillConfig, ["--actor-resources", "ondemand=1"]))
    assert missing.initial_actors == 1 and "no node in the Ray cluster declares 'ondemand'" in capsys.readouterr().out


def test_gpu_actors_on_a_cluster_whose_gpu_nodes_are_still_to_come(monkeypatch, capsys):
    """An autoscaling GPU group at 0 nodes (cluster/kuberay, cluster/aws-gpu-spot.yaml): --num-gpus 1 plans GPU
    actors that wait for the autoscaler instead of failing; auto mode on such a cluster says it chose CPUs."""
    import ray

    from d3hr_ray.workers.resources import plan_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    gpu = plan_resources(config_from_args(DistillConfig, ["--num-gpus", "1", "--max-actors", "64"]))
    assert (gpu.device, gpu.dtype, gpu.num_gpus, gpu.initial_actors, gpu.actors) == ("cuda", "bfloat16", 1.0, 1, 64)
    assert "the model actors wait for GPU nodes" in capsys.readouterr().out
    auto = plan_resources(config_from_args(DistillConfig, []))
    assert auto.device == "cpu" and "pass --num-gpus 1" in capsys.readouterr().out
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 4.0})
    grown = plan_resources(config_from_args(DistillConfig, ["--max-actors", "64"]))
    assert (grown.device, grown.initial_actors, grown.actors) == ("cuda", 4, 64) and capsys.readouterr().out == ""


def test_quiet_by_default_verbose_on_request(monkeypatch):
    """The distill CLI's logging setup: Ray's logger and Ray Data's console at WARNING unless --verbose (Ray Data's
    file log keeps its INFO), and Ray Data's progress bars on a terminal only (or with --verbose)."""
    import logging

    from ray.data import DataContext

    from d3hr_ray.workers.resources import configure_data_context, quiet_logs

    assert config_from_args(DistillConfig, []).verbose is False
    assert config_from_args(DistillConfig, ["--verbose"]).verbose is True
    data = logging.getLogger("ray.data")
    handlers = {h.name: h for h in data.handlers}
    for obj in (logging.getLogger("ray"), logging.getLogger("ray.data._internal.progress"), *handlers.values()):
        monkeypatch.setattr(obj, "level", obj.level)  # restored when the test ends
    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", ctx.enable_progress_bars)
    monkeypatch.setattr(ctx, "max_consecutive_actor_init_deaths", ctx.max_consecutive_actor_init_deaths)

    def shown(name: str, level: int) -> bool:
        """Whether a record of `level` from logger `name` reaches Ray Data's console handler."""
        logger = logging.getLogger(name)
        return logger.isEnabledFor(level) and level >= handlers["console"].level

    quiet_logs(verbose=False)
    assert logging.getLogger("ray").getEffectiveLevel() == logging.WARNING
    assert not shown("ray.data._internal.execution.streaming_executor", logging.INFO)  # plans, logged progress
    assert shown("ray.data._internal.execution.streaming_executor", logging.WARNING)
    assert not shown("ray.data._internal.progress", logging.WARNING)  # "progress bars disabled", turned off here
    assert data.isEnabledFor(logging.INFO) and handlers["file"].level <= logging.INFO  # ray-data.log keeps INFO
    quiet_logs(verbose=True)
    assert logging.getLogger("ray").getEffectiveLevel() == logging.INFO
    assert shown("ray.data._internal.execution.streaming_executor", logging.INFO)
    assert shown("ray.data._internal.progress", logging.INFO)

    for verbose, terminal, bars in ((False, False, False), (False, True, True), (True, False, True)):
        configure_data_context(verbose, terminal=terminal)
        assert ctx.enable_progress_bars is bars, (verbose, terminal)
    assert ctx.max_consecutive_actor_init_deaths != 0


def test_compile_auto_compiles_past_the_measured_break_even_only():
    be = COMPILE_BREAK_EVEN_IMAGES["cuda"]
    assert compile_choice("auto", "cuda", be + 1) == (
        True,
        f"compiled: {be + 1:,} images per actor > break-even {be:,} on cuda",
    )
    on, why = compile_choice("auto", "cuda", be)
    assert not on and why.startswith("eager:") and f"{be:,}" in why
    on, why = compile_choice("auto", "cpu", 10**9)  # no break-even measured on CPUs: never compiled by auto
    assert not on and "no measured break-even on cpu" in why
    assert compile_choice("on", "cpu", 1) == (True, "--compile on")
    assert compile_choice("off", "cuda", 10**9) == (False, "--compile off")
