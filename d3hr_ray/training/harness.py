"""The one Ray Train harness of the training jobs (finetune, train_teacher, evaluate).

Driver side:
    start_ray(use_gpu)                join RAY_ADDRESS or start a local Ray; whether workers take a GPU
    RunSpec                           one run's name, storage, workers, GPUs and retries (frozen)
    fit(loop, cfg, datasets, spec)    a TorchTrainer that calls `loop(cfg)` on every worker
    checkpoint_state(result)          the state.json of a run's last checkpoint (epoch, history, ...)

Worker side (inside `loop`):
    worker(torch_threads)             this worker's rank, world size and device
    resume(load)                      the last checkpoint, if the run has one: the model, the optimizer
                                      state, the first epoch still to run, the metrics so far
    finish_if_done(resumed, ...)      a rerun of a finished run reports its last checkpoint, trains nothing
    save_and_report(metrics, ...)     one checkpoint folder, then `ray.train.report`

Every job's checkpoint has one layout: the model files the job writes, `optimizer.pt`, and
`state.json` = {"epoch": the last finished epoch (0-based), "history": every reported metrics dict,
plus the job's extras such as "best"}. Rerunning with the same name and storage path resumes from it,
and the history of a resumed run is the whole run's.

The loop's configuration is a frozen dataclass (the job's loop config); Ray pickles it to the workers
inside `train_loop_config`, so the workers read typed, validated fields, not dict keys.

Ray Train V2 is selected by an explicit call, `use_train_v2()`, at the start of each job's `run()` (and
by the tests' conftest): Ray reads the flag once, when `ray.train` is first imported, so the call comes
before that and raises if it comes too late in a process that turned V2 off. V2 is Ray 2.60's default;
the call keeps a user's `RAY_TRAIN_V2_ENABLED=0` from silently running the jobs on the old API.

The flags every training job shares (workers, GPUs, run name, storage, retries, threads) are one
dataclass, `TrainRunFields`, that the jobs' configs extend; `RunSpec.of` reads them. The classifier jobs'
loop flags (train_teacher, evaluate) extend it once more, `ClassifierRunFields`.

Ray and torch are imported inside the functions that use them: every job's config extends `TrainRunFields`,
and the configs parse (and `--help` prints) without torch or Ray; `ray.train` also must wait for
`use_train_v2()` (tests/training/test_harness.py holds both).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from d3hr_ray.flags import require, require_positive_ints
from d3hr_ray.tracking import MLflowRun, log_metrics

if TYPE_CHECKING:
    import torch
    from ray.data import Dataset
    from ray.train import Checkpoint, Result

TRAIN_V2_FLAG = "RAY_TRAIN_V2_ENABLED"

__all__ = [
    "CHECKPOINTS_KEPT",
    "ClassifierRunFields",
    "DEFAULT_STORAGE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "TRAIN_V2_FLAG",
    "Resumed",
    "RunSpec",
    "TrainRunFields",
    "Worker",
    "checkpoint_state",
    "finish_if_done",
    "fit",
    "last_checkpoint",
    "resume",
    "save_and_report",
    "start_ray",
    "use_train_v2",
    "worker",
]

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
# Two checkpoints: the newest, and the one before it in case the newest was cut off mid-upload.
CHECKPOINTS_KEPT = 2
# Ray Train's own default; spelt out because the jobs' --storage-path help names it.
DEFAULT_STORAGE = "~/ray_results"


# -- driver side ------------------------------------------------------------------------------------


def use_train_v2() -> None:
    """Select Ray Train V2 for this process; call it before anything imports `ray.train`.

    Raises RuntimeError when `ray.train` was already imported with V2 turned off (`RAY_TRAIN_V2_ENABLED=0`),
    which no later setting can undo.
    """
    if "ray.train" in sys.modules and os.environ.get(TRAIN_V2_FLAG, "1").lower() in ("0", "false", "no", "off"):
        raise RuntimeError(
            f"ray.train was imported with {TRAIN_V2_FLAG}={os.environ[TRAIN_V2_FLAG]}; the jobs need Ray Train V2: "
            f"unset it or set it to 1 before the job starts"
        )
    os.environ[TRAIN_V2_FLAG] = "1"


@dataclass(frozen=True)
class TrainRunFields:
    """The Ray Train run flags of every training job (finetune, train_teacher, evaluate): their configs extend this."""

    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP)"})
    use_gpu: bool | None = field(
        default=None, metadata={"help": "workers take a GPU each (default: when the cluster has GPUs)"}
    )
    name: str = field(
        default="d3hr-run", metadata={"help": "run name; rerunning with the same name and storage resumes"}
    )
    storage_path: str | None = field(
        default=None, metadata={"help": f"checkpoints (local or s3://; default {DEFAULT_STORAGE})"}
    )
    max_failures: int = field(
        default=2, metadata={"help": "worker-group restarts from the last checkpoint before giving up"}
    )
    mlflow: str | None = field(
        default=None,
        metadata={
            "help": "MLflow tracking URI (default: MLFLOW_TRACKING_URI; unset: no tracking): the settings, every "
            "epoch's metrics and the results; a resumed run continues its MLflow run"
        },
    )
    mlflow_experiment: str | None = field(
        default=None,
        metadata={
            "help": "MLflow experiment of a new run (default: MLFLOW_EXPERIMENT_NAME, else the job's module, e.g. "
            "d3hr_ray.evaluate)"
        },
    )
    torch_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch threads per worker (default: Ray's, one per CPU the worker reserves, i.e. 1); on a "
            "CPU-only node set it to the cores"
        },
    )

    def __post_init__(self) -> None:
        require_positive_ints(self, "num_workers")
        require(
            self,
            isinstance(self.max_failures, int) and self.max_failures >= 0,
            "max_failures",
            "must be an integer >= 0",
        )
        require(self, bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        if self.torch_threads is not None:
            require_positive_ints(self, "torch_threads")


@dataclass(frozen=True)
class ClassifierRunFields(TrainRunFields):
    """The classifier loop's flags that train_teacher and evaluate share, validated once; a job redeclares a field
    to give it its own default and help (epochs, batch_size, crop_scale). `classifier_loop.ClassifierLoopConfig.of`
    reads them."""

    resolution: int | None = field(default=None, metadata={"help": "image side (default: the data's)"})
    epochs: int = field(default=30, metadata={"help": "epochs"})
    batch_size: int = field(default=128, metadata={"help": "global batch size"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate (default: the architecture's)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, on weights only"})
    crop_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata={"help": "RandomResizedCrop area range"})
    cache_gb: float = field(
        default=4.0,
        metadata={"help": "hold a data set in each worker's memory (uint8) when it fits in this many GiB; else stream"},
    )
    seed: int = field(default=0, metadata={"help": "seed for initialisation, order and augmentation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_ints(self, "epochs", "batch_size")
        require(self, self.lr is None or self.lr > 0, "lr", "must be > 0")
        require(self, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(
            self,
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_scale",
            "must be two numbers 0 < a <= b <= 1",
        )
        require(self, self.cache_gb >= 0, "cache_gb", "must be >= 0")
        if self.resolution is not None:
            require(self, self.resolution >= 8, "resolution", "must be >= 8")


def start_ray(use_gpu: bool | None) -> bool:
    """Join the cluster (RAY_ADDRESS, or a local instance started here); whether workers take a GPU.

    Args:
        use_gpu: the job's --use-gpu; None means "when the cluster has GPUs".
    """
    import ray  # torch-free configs import this module (see the module's docstring)

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    return use_gpu if use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0


@dataclass(frozen=True)
class RunSpec:
    """How one Ray Train run is scheduled; `name` + `storage_path` identify it for resuming."""

    name: str
    num_workers: int
    use_gpu: bool
    max_failures: int
    storage_path: str | None = None  # local or s3://; None: DEFAULT_STORAGE

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run name must be non-empty and without '/', got {self.name!r}")
        if self.num_workers < 1 or self.max_failures < 0:
            raise ValueError(
                f"need num_workers >= 1 and max_failures >= 0, got {self.num_workers}, {self.max_failures}"
            )

    @classmethod
    def of(cls, job_cfg: TrainRunFields, *, use_gpu: bool, name: str | None = None) -> RunSpec:
        """From a job config with name, num_workers, max_failures and storage_path fields."""
        return cls(
            name=name or job_cfg.name,
            num_workers=job_cfg.num_workers,
            use_gpu=use_gpu,
            max_failures=job_cfg.max_failures,
            storage_path=job_cfg.storage_path,
        )

    @property
    def storage(self) -> str:
        return self.storage_path or str(Path(DEFAULT_STORAGE).expanduser())


def _entry(config: dict[str, Any]) -> None:
    """Every worker's entry point: the job's loop on its frozen loop config."""
    config["loop"](config["cfg"])


def fit(
    loop: Callable[[Any], None],
    cfg: Any,
    datasets: Mapping[str, Dataset],
    spec: RunSpec,
    *,
    datasets_to_split: Literal["all"] | list[str] = "all",
) -> Result:
    """Run `loop(cfg)` on spec.num_workers Ray Train workers (DDP); returns the `ray.train.Result`.

    Args:
        loop: a worker function of one argument, the frozen loop config.
        cfg: the loop config (the job's frozen dataclass, any type: the harness only hands it to `loop`).
        datasets: name -> Ray Dataset, read in the loop with `ray.train.get_dataset_shard(name)`.
        spec: the run's name, storage, workers, GPU and retries.
        datasets_to_split: which datasets are split across workers ("all", or a list; the others
            reach every worker whole).
    """
    import ray.train  # after use_train_v2() (see the module's docstring)
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _entry,
        train_loop_config={"loop": loop, "cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=spec.storage,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(datasets_to_split=datasets_to_split),
    )
    return trainer.fit()


def last_checkpoint(result: Result) -> Checkpoint:
    """A finished run's last checkpoint (every job's loop reports one at each evaluation); RuntimeError without one."""
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run at {result.path} reported no checkpoint")
    return result.checkpoint


def checkpoint_state(result: Result) -> dict[str, Any]:
    """The state.json of a finished run's last checkpoint: {"epoch", "history" (resumed runs included), ...}."""
    with last_checkpoint(result).as_directory() as d:
        return json.loads((Path(d) / STATE_FILE).read_text())


# -- worker side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """This Ray Train worker: its rank in [0, world) and its device."""

    rank: int
    world: int
    device: torch.device


def worker(torch_threads: int | None) -> Worker:
    """This worker's rank, world size and device; sets torch's thread count when asked to."""
    import ray.train  # these three: see the module's docstring
    import ray.train.torch
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    ctx = ray.train.get_context()
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


@dataclass(frozen=True)
class Resumed:
    """Where a run stands: the first epoch still to run, the metrics so far, the rest of state.json."""

    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # every reported metrics dict
    state: dict[str, Any] = field(default_factory=dict)  # state.json
    optimizer: dict[str, Any] | None = None  # the optimizer's state_dict, to load after the model is prepared


def resume(load: Callable[[Path], Any]) -> tuple[Any, Resumed]:
    """(load(checkpoint folder), Resumed) from this run's last checkpoint; (None, Resumed()) without one.

    `load` runs while the checkpoint is on local disk (it may be on s3://): it reads the job's model
    files and returns the model (or loads them into one and returns anything).
    """
    import ray.train  # these two: see the module's docstring
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return None, Resumed()
    with ckpt.as_directory() as d:
        loaded = load(Path(d))
        opt_state = torch.load(Path(d) / OPTIMIZER_FILE, weights_only=True)
        state = json.loads((Path(d) / STATE_FILE).read_text())
    return loaded, Resumed(start=state["epoch"] + 1, history=state["history"], state=state, optimizer=opt_state)


def finish_if_done(resumed: Resumed, epochs: int, rank: int, metrics: dict[str, Any] | None = None) -> bool:
    """A rerun of a run that already has all its epochs: report its last checkpoint again, and True.

    Lets a finished (or deliberately shortened: rerun with fewer --epochs) run hand its result to the
    driver without training. `metrics` is what to report (default: the last history entry).
    """
    import ray.train  # see the module's docstring

    if resumed.start < epochs or not resumed.history:
        return False
    with ray.train.get_checkpoint().as_directory() as d:
        ray.train.report(
            metrics if metrics is not None else resumed.history[-1],
            checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
        )
    return True


def save_and_report(
    metrics: dict[str, Any],
    *,
    rank: int,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tracking: MLflowRun | None = None,
    metric_prefix: str = "",
) -> None:
    """Rank 0 writes a checkpoint folder (save_model(folder), optimizer.pt, state.json) and logs the metrics to
    MLflow; every rank reports.

    Args:
        metrics: this epoch's metrics, reported to Ray Train (and to MLflow, numbers only, at step "epoch").
        rank: this worker's rank; only rank 0 writes and logs (the DDP replicas are identical).
        save_model: writes the job's model files into the folder.
        optimizer: its state_dict goes to optimizer.pt.
        state: state.json, with at least "epoch" and "history".
        tracking: the job's `tracking.MLflowRun`, or None; metric_prefix: prepended to every metric's name there.
    """
    import ray.train  # these two: see the module's docstring
    import torch

    if "epoch" not in state or "history" not in state:
        raise ValueError(
            f"save_and_report: state needs 'epoch' and 'history' (resume() reads them), got {sorted(state)}"
        )
    if rank == 0 and tracking is not None:
        log_metrics(tracking, {metric_prefix + k: v for k, v in metrics.items()}, step=metrics.get("epoch"))
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_model(Path(d))
            torch.save(optimizer.state_dict(), Path(d) / OPTIMIZER_FILE)
            (Path(d) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
