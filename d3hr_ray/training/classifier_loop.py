"""The Ray Train worker loop shared by `train_teacher` (hard labels) and `evaluate` (the D3HR student protocol).

One loop, three objectives (the label regimes of `evaluate --labels`, docs/evaluate.md):
    "ce"    cross-entropy on the class labels; with CutMix, on the one-hot labels mixed by area ("hard";
            a teacher on the real data trains this way without CutMix);
    "kd"    docs/method.md stage 6: KL to the frozen teacher's softened outputs on the same CutMixed batch;
    "soft"  fixed soft labels: the teacher labels each cached training image once, un-augmented, at T,
            before the first epoch; the student learns those stored targets (mixed by area under
            CutMix) with the KL loss of "kd", and the teacher is never called while training.

Data: when the training set fits the per-worker cache (always for a distilled set), every worker holds
all of it as uint8 and walks the same seeded global batches, training on its own slice of each
(`protocol.batch_plan`): the augmentation of an image is the same whatever the number of workers.
Otherwise the set streams from this worker's Ray Data shard each epoch. The test set (never split)
is cached the same way; each worker scores every world-th batch and the counts are all-reduced.

Every evaluation's metrics count the images used, so the driver never decodes a set just to count it:
`train_images`/`train_refused` (the cache's, or the last streamed epoch's summed over the workers) and
`test_images` (summed over the workers).

A checkpoint (model, optimizer, epoch, history, best) is reported at every evaluation; a rerun with
the same run name resumes from the last one (the harness, `d3hr_ray.training.harness`, does the saving,
resuming and reporting). The loop reads a frozen `ClassifierLoopConfig`.

Random streams are named by purpose (d3hr_ray/seeding.py): the fresh weights by (seed, "classifier-init");
an epoch's batch order and augmentation by (seed, "classifier-epoch", epoch) when cached (the same on
every worker), by (seed, "classifier-epoch", epoch, rank) when streamed (each worker's own shard).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from d3hr_ray.seeding import derive_seed
from d3hr_ray.training import harness
from d3hr_ray.training.choices import STUDENT_LRS
from d3hr_ray.training.protocol import (
    FLIP_P,
    AugmentParams,
    apply_augment,
    batch_plan,
    cosine_factor,
    cut_box,
    draw_augment,
    kd_loss,
    mix_targets,
    normalize,
    param_groups,
    soft_cross_entropy,
    soft_targets,
    topk_correct,
)
from d3hr_ray.training.students import STUDENTS, build_student

if TYPE_CHECKING:
    from ray.data import DataIterator, Dataset
    from ray.train import Result

    from d3hr_ray.tracking import MLflowRun

__all__ = [
    "EVAL_BATCH_SIZE",
    "LOAD_BATCH_ROWS",
    "OBJECTIVES",
    "TEACHER_OBJECTIVES",
    "ClassifierLoopConfig",
    "batch_loss",
    "classifier_history",
    "classifier_loop",
    "fit_classifier",
    "fits_cache",
    "load_rows",
    "stored_targets",
]

OBJECTIVES = ("ce", "kd", "soft")
# Objectives that need the frozen teacher (its weights travel as `teacher_ref`).
TEACHER_OBJECTIVES = ("kd", "soft")
# Test images per forward pass: memory only, the scores do not depend on it (eval mode).
EVAL_BATCH_SIZE = 256
# Rows per Ray Data batch while a data set is read into a worker's cache.
LOAD_BATCH_ROWS = 256


# A worker's test set: cached, (x (N, 3, R, R) uint8, y (N,) int64); or streamed, a function giving (x, y) batches.
TestSet = tuple[torch.Tensor, torch.Tensor] | Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def fits_cache(rows: int, resolution: int, cache_gb: float) -> bool:
    """Whether `rows` uint8 images of 3 x R x R fit the per-worker cache."""
    return rows * 3 * resolution * resolution <= cache_gb * 2**30


@dataclass(frozen=True)
class ClassifierLoopConfig:
    """What `classifier_loop` needs; built by `train_teacher.run` ("ce") and `evaluate.run` ("kd")."""

    objective: str  # "ce": labels (hard); "kd": the teacher on every batch; "soft": the teacher's stored targets
    arch: str  # a key of the student registry
    num_classes: int
    resolution: int  # R: images are (3, R, R)
    epochs: int
    batch_size: int  # global batch size
    lr: float  # peak AdamW learning rate (cosine schedule)
    weight_decay: float  # on weights only
    crop_scale: tuple[float, float]  # RandomResizedCrop area range
    eval_every: int  # epochs between test evaluations (and the last epoch)
    mean: tuple[float, float, float]  # input normalisation
    std: tuple[float, float, float]
    seed: int
    cache_train: bool  # every worker holds the whole training set (else: Ray Data shards, streamed)
    cache_test: bool
    cutmix_alpha: float = 0.0  # 0: no CutMix
    cutmix_p: float = 0.0
    temperature: float = 1.0  # T of the soft targets ("kd", "soft")
    teacher_ref: ray.ObjectRef | None = None  # of (teacher meta, state dict), for "kd" and "soft"
    flip_p: float = FLIP_P
    eval_batch_size: int = EVAL_BATCH_SIZE
    torch_threads: int | None = None
    tracking: MLflowRun | None = None  # rank 0 logs every evaluation's metrics there
    metric_prefix: str = ""  # e.g. "seed-3/": a repeat's metrics apart from the others' in one MLflow run

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective in TEACHER_OBJECTIVES and self.teacher_ref is None:
            raise ValueError(f"the {self.objective} objective needs teacher_ref")
        if self.objective == "soft" and not self.cache_train:
            raise ValueError(
                "fixed soft labels are computed once per cached image: the training set must fit the cache (--cache-gb)"
            )
        if self.arch not in STUDENTS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(STUDENTS)}")
        sizes = (self.num_classes, self.resolution, self.epochs, self.batch_size, self.eval_every, self.eval_batch_size)
        if min(sizes) < 1:
            raise ValueError(
                f"num_classes, resolution, epochs, batch_size, eval_every and eval_batch_size must be >= 1, got {sizes}"
            )
        if len(self.crop_scale) != 2 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"crop_scale needs 2 numbers and mean, std 3 each, got {self.crop_scale}, {self.mean}, {self.std}"
            )

    @classmethod
    def of(
        cls,
        job: harness.ClassifierRunFields,
        *,
        objective: str,
        arch: str,
        num_classes: int,
        resolution: int,
        eval_every: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        n_train: int,
        n_test: int,
        tracking: MLflowRun | None,
        cutmix_alpha: float = 0.0,
        cutmix_p: float = 0.0,
        temperature: float = 1.0,
        teacher_ref: ray.ObjectRef | None = None,
        metric_prefix: str = "",
    ) -> ClassifierLoopConfig:
        """The loop config of a job (train_teacher, evaluate): its shared flags (epochs, batch size, learning rate,
        weight decay, crop scale, cache, threads), and what the job resolved.

        Args:
            job: the job's config; its --lr, else the architecture's (training/choices.py).
            n_train, n_test: the inputs listed for the training and test sets: with --cache-gb they decide
                whether each set is held in every worker's memory.
        """
        r0, r1 = job.crop_scale
        return cls(
            objective=objective,
            arch=arch,
            num_classes=num_classes,
            resolution=resolution,
            epochs=job.epochs,
            batch_size=job.batch_size,
            lr=job.lr or STUDENT_LRS[arch],
            weight_decay=job.weight_decay,
            crop_scale=(r0, r1),
            eval_every=eval_every,
            mean=_three(mean),
            std=_three(std),
            seed=seed,
            cache_train=fits_cache(n_train, resolution, job.cache_gb),
            cache_test=fits_cache(n_test, resolution, job.cache_gb),
            cutmix_alpha=cutmix_alpha,
            cutmix_p=cutmix_p,
            temperature=temperature,
            teacher_ref=teacher_ref,
            torch_threads=job.torch_threads,
            tracking=tracking,
            metric_prefix=metric_prefix,
        )


def _three(values: Sequence[float]) -> tuple[float, float, float]:
    """An RGB normalisation (mean or std) as the loop config's 3-tuple."""
    if len(values) != 3:
        raise ValueError(f"mean and std need 3 numbers (RGB), got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


def _usable(shard: DataIterator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(x (b, 3, R, R) uint8, y (b,) int64, refused count) per batch of a Ray Data iterator of classifier rows."""
    for bt in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        ok = np.asarray(bt["ok"], dtype=bool)
        yield (
            torch.from_numpy(np.ascontiguousarray(bt["image"][ok])),
            torch.from_numpy(np.asarray(bt["label"], dtype=np.int64)[ok]),
            int((~ok).sum()),
        )


def load_rows(shard: DataIterator, batch_size: int = LOAD_BATCH_ROWS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every usable row of a Ray Data iterator of classifier rows: (N, 3, R, R) uint8, (N,) int64, refused count."""
    parts = list(_usable(shard, batch_size))
    if not parts:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), 0
    return torch.cat([x for x, _, _ in parts]), torch.cat([y for _, y, _ in parts]), sum(n for _, _, n in parts)


def _stream(shard: DataIterator, batch_size: int, refused: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of a streamed shard; the rows it refuses are added to refused[0]."""
    for x, y, n in _usable(shard, batch_size):
        refused[0] += n
        yield x, y


def _sum_over_workers(values: list[int], world: int, device: torch.device) -> list[int]:
    """Each value summed over the workers of the run (the value itself with one worker)."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.cpu().tolist()]


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module,
    test: TestSet,
    cfg: ClassifierLoopConfig,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[float, float, int]:
    """(top-1, top-5, images scored) of `model` on the whole test set, this worker scoring every world-th batch."""
    model.eval()
    counts = [0, 0, 0]
    batches = test() if callable(test) else _chunks(test[0], test[1], cfg.eval_batch_size)
    for i, (x, y) in enumerate(batches):
        if i % world != rank or len(y) == 0:
            continue
        logits = model(normalize(x.to(device), cfg.mean, cfg.std))
        c1, c5 = topk_correct(logits, y.to(device), ks=(1, 5))
        counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(y)]
    c1, c5, scored = _sum_over_workers(counts, world, device)
    n = max(scored, 1)
    return c1 / n, c5 / n, scored


def _frozen_teacher(cfg: ClassifierLoopConfig, device: torch.device) -> torch.nn.Module:
    """The teacher of "kd" and "soft", from `cfg.teacher_ref`, on `device` in eval mode, its parameters frozen."""
    if cfg.teacher_ref is None:
        raise ValueError(f"the {cfg.objective} objective needs teacher_ref")
    meta, state = ray.get(cfg.teacher_ref)
    teacher = build_student(meta["arch"], meta["num_classes"], cfg.resolution)
    teacher.load_state_dict(state)
    return teacher.to(device).eval().requires_grad_(False)


@torch.no_grad()
def stored_targets(
    teacher: torch.nn.Module | None, x: torch.Tensor, cfg: ClassifierLoopConfig, device: torch.device
) -> torch.Tensor:
    """The "soft" regime's fixed targets: softmax(teacher(x) / T) of each un-augmented image, in eval mode.

    Args:
        x: (N, 3, R, R) uint8, the cached training set.
    Returns:
        (N, K) float32 on `device`.
    """
    if teacher is None:
        raise ValueError("the soft objective's targets need the teacher")
    b = cfg.eval_batch_size
    out = [
        soft_targets(teacher(normalize(x[s : s + b].to(device), cfg.mean, cfg.std)), cfg.temperature)
        for s in range(0, len(x), b)
    ]
    return torch.cat(out) if out else torch.zeros((0, cfg.num_classes), device=device)


def batch_loss(
    cfg: ClassifierLoopConfig,
    logits: torch.Tensor,
    xm: torch.Tensor,
    yb: torch.Tensor,
    stored: torch.Tensor | None,
    idx: np.ndarray | None,
    params: AugmentParams,
    rows: np.ndarray,
    denom: float,
    teacher: torch.nn.Module | None = None,
) -> torch.Tensor:
    """One batch's loss under `cfg.objective`, summed over this worker's rows and divided by `denom`.

    Args:
        logits: (b, K) the student's on the augmented, mixed images xm (b, 3, R, R).
        yb: (B,) int64 class ids of the global batch; stored: (N, K) the "soft" targets, idx: (B,) the batch's
            rows of the cached set (None unless "soft"); params, rows: the batch's augmentation and this worker's
            positions in it (`protocol.apply_augment`).
        teacher: the frozen teacher ("kd").
    """
    R = cfg.resolution
    if cfg.objective == "kd":
        if teacher is None:
            raise ValueError("the kd objective's loss needs the teacher")
        with torch.no_grad():
            targets = soft_targets(teacher(xm), cfg.temperature)
        return kd_loss(logits, targets, cfg.temperature, denominator=denom)
    if cfg.objective == "soft":
        if stored is None or idx is None:
            raise ValueError("the soft objective's loss needs the stored targets and the batch's rows (idx)")
        targets = mix_targets(stored[torch.as_tensor(idx, device=stored.device)], params, rows, R)
        return kd_loss(logits, targets, cfg.temperature, denominator=denom)
    y = yb.to(logits.device)
    if cut_box(params, R) is None:  # no CutMix on this batch: plain cross-entropy on the labels
        return (
            torch.nn.functional.cross_entropy(
                logits.float(), y[torch.as_tensor(rows, device=y.device)], reduction="sum"
            )
            / denom
        )
    onehot = torch.nn.functional.one_hot(y, cfg.num_classes).float()  # (B, K)
    return soft_cross_entropy(logits, mix_targets(onehot, params, rows, R), denominator=denom)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, len(y), size):
        yield x[s : s + size], y[s : s + size]


def classifier_loop(cfg: ClassifierLoopConfig) -> None:
    """Ray Train worker: train `cfg.arch` with `cfg.objective`; evaluate, checkpoint every `cfg.eval_every` epochs."""
    # ray.train is imported after harness.use_train_v2() has selected Train V2 (it reads the flag on import).
    import ray.train
    import ray.train.torch

    w = harness.worker(cfg.torch_threads)
    rank, world, device = w.rank, w.world, w.device
    R = cfg.resolution
    torch.manual_seed(derive_seed(cfg.seed, "classifier-init"))  # the same fresh weights on every worker
    model = build_student(cfg.arch, cfg.num_classes, R)
    _, resumed = harness.resume(lambda d: model.load_state_dict(load_file(str(d / "model.safetensors"))))
    history, best = list(resumed.history), resumed.state.get("best", {})

    def with_best(metrics: dict) -> dict:
        return dict(metrics, best_top1=best["top1"], best_top5=best["top5"], best_epoch=best["epoch"])

    if resumed.history and harness.finish_if_done(resumed, cfg.epochs, rank, with_best(history[-1])):
        return
    if world > 1 and device.type == "cuda":  # batch statistics over the global batch; before the DDP wrap
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    if resumed.optimizer:
        opt.load_state_dict(resumed.optimizer)
    teacher = _frozen_teacher(cfg, device) if cfg.objective in TEACHER_OBJECTIVES else None

    train_shard = ray.train.get_dataset_shard("train")
    cached, refused, stored = cfg.cache_train, None, None
    if cached:
        x_all, y_all, refused = load_rows(train_shard)
        n_train = len(y_all)
    test_shard = ray.train.get_dataset_shard("test")
    test = load_rows(test_shard)[:2] if cfg.cache_test else (lambda: _stream(test_shard, cfg.eval_batch_size, [0]))
    if cached and n_train == 0:
        raise ValueError(f"the training set has no usable image ({refused} refused)")
    if cfg.objective == "soft":  # labelled once, before training; the teacher is not called again
        stored, teacher = stored_targets(teacher, x_all, cfg, device), None

    def augment(rng: np.random.Generator, n: int) -> AugmentParams:
        return draw_augment(
            rng, n, scale=cfg.crop_scale, flip_p=cfg.flip_p, cutmix_alpha=cfg.cutmix_alpha, cutmix_p=cfg.cutmix_p
        )

    train_s, seen_since = 0.0, 0  # training time and images since the last evaluation (its rate is reported)
    for epoch in range(resumed.start, cfg.epochs):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_factor(epoch, cfg.epochs)
        model.train()
        t0, seen, total, streamed_refused = time.perf_counter(), 0, 0.0, [0]
        # (images, labels, rows of the cached set or None, augmentation, this worker's rows, loss denominator)
        batches: Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray | None, AugmentParams, np.ndarray, float]]
        if cached:  # one stream for the global batches, the same on every worker
            rng = np.random.default_rng(derive_seed(cfg.seed, "classifier-epoch", epoch))
            batches = (
                (x_all[idx], y_all[idx], idx, augment(rng, len(idx)), rows, len(idx) / world)
                for idx, rows in batch_plan(n_train, cfg.batch_size, rng, rank, world)
            )
        else:  # each worker augments its own shard
            rng = np.random.default_rng(derive_seed(cfg.seed, "classifier-epoch", epoch, rank))
            local = max(1, cfg.batch_size // world)
            batches = (
                (x, y, None, augment(rng, len(y)), np.arange(len(y)), float(len(y)))
                for x, y in _stream(train_shard, local, streamed_refused)
                if len(y) > 0
            )
        for xb, yb, idx, params, rows, denom in batches:
            xm = apply_augment(normalize(xb.to(device), cfg.mean, cfg.std), params, rows, R)  # (b, 3, R, R)
            logits = model(xm)
            loss = batch_loss(cfg, logits, xm, yb, stored, idx, params, rows, denom, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(rows)
            total += loss.item() * denom  # this worker's summed loss
        train_s += time.perf_counter() - t0
        seen_since += seen * world
        last = epoch + 1 == cfg.epochs
        if not last and (epoch + 1) % cfg.eval_every != 0:
            continue
        rate, train_s, seen_since = seen_since / max(train_s, 1e-9), 0.0, 0
        if not cached:  # a streamed epoch: the images every worker trained on and refused in it
            n_train, refused = _sum_over_workers([seen, streamed_refused[0]], world, device)
            if n_train == 0:
                raise ValueError(f"the training set has no usable image ({refused} refused)")
        top1, top5, n_test = _evaluate(model, test, cfg, device, rank, world)
        metrics = {
            "epoch": epoch + 1,
            "loss": total / max(seen, 1),
            "top1": top1,
            "top5": top5,
            "test_images": n_test,
            "train_images": n_train,
            "train_refused": refused,
            "train_images_per_s": rate,
        }
        if not best or top1 > best["top1"]:
            best = {"top1": top1, "top5": top5, "epoch": epoch + 1}
        history.append(metrics)
        if rank == 0:
            print(
                f"[{cfg.objective}] epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.4f}, "
                f"test top-1 {top1:.4f} (best {best['top1']:.4f}), {metrics['train_images_per_s']:.0f} images/s",
                flush=True,
            )
        net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

        def save(d: Path, net: torch.nn.Module = net) -> None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors")
            )

        harness.save_and_report(
            with_best(metrics),
            rank=rank,
            save_model=save,
            optimizer=opt,
            state={"epoch": epoch, "history": history, "best": best},
            tracking=cfg.tracking,
            metric_prefix=cfg.metric_prefix,
        )


# -- driver side: one run of this loop, and what it left in its checkpoint --------------------------


def fit_classifier(
    loop_cfg: ClassifierLoopConfig, train_ds: Dataset, test_ds: Dataset, spec: harness.RunSpec
) -> Result:
    """Run `classifier_loop(loop_cfg)` on Ray Train; the train set is split across workers only when not cached.

    Args:
        loop_cfg: a `ClassifierLoopConfig`.
        train_ds, test_ds: Ray Datasets of classifier rows (the test set reaches every worker whole).
        spec: a `harness.RunSpec`.
    Returns:
        ray.train.Result.
    """
    return harness.fit(
        classifier_loop,
        loop_cfg,
        {"train": train_ds, "test": test_ds},
        spec,
        datasets_to_split=[] if loop_cfg.cache_train else ["train"],
    )


def classifier_history(result: Result) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(every evaluation's metrics, the best) of a finished run, resumed runs included (kept in the checkpoint)."""
    state = harness.checkpoint_state(result)
    return state["history"], state["best"]
