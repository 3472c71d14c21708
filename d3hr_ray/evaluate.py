"""`python -m d3hr_ray.evaluate`: docs/method.md stage 6, a student trained on a distilled (or baseline) set.

    train set   --distilled (a distill output folder, or any ImageFolder/Parquet), or a baseline on the
                real --real data: --baseline random-real --ipc K (K random images per class, seeded per
                repeat), herding or k-center --ipc K (coresets chosen per class from the --teacher's
                features, evaluation/coresets.py), or full; the chosen keys go to <output>/sets/
    student     from the registry (--student), fresh weights, seeded
    protocol    RandomResizedCrop(0.08-1) + flip, CutMix (Beta(1, 1)), AdamW (weight decay 0.01 on
                weights only), cosine schedule; every knob is a flag. --labels picks the targets:
                kd (default, the paper's): softmax(teacher / 20) of the frozen --teacher on each mixed
                batch, KL loss; soft: the teacher's targets of each un-augmented image, computed once and
                mixed by CutMix; hard: the class labels, cross-entropy (no teacher needed)
    result      best test top-1 (and the top-5 of that evaluation) per repeat on the real --test set;
                results.json (every repeat, mean and std, config, timings) and results.md (a table row)

Ray Train: TorchTrainer over --num-workers (DDP, GPUs when the cluster has them); each repeat is a run
named <name>-seed<seed> with a checkpoint at every evaluation; rerunning the same command skips the
finished repeats (their results are in --output) and resumes the unfinished one.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from d3hr_ray import tracking
from d3hr_ray.cli import main_for
from d3hr_ray.data.sources import read_label_names
from d3hr_ray.diagnose.figure import learning_curves
from d3hr_ray.evaluation.choices import CORESET_RULES, STUDENT_LRS
from d3hr_ray.flags import require, require_positive_ints
from d3hr_ray.training import harness

__all__ = ["BASELINES", "EVALUATIONS_PER_RUN", "LABELS", "RESULT_KEYS", "EvaluateConfig", "main", "run"]

# Baselines that choose --ipc images per class of --real (random, or a coreset of the teacher's features).
_CHOOSERS = ("random-real", *CORESET_RULES)
BASELINES = (*_CHOOSERS, "full")
# The label regimes (docs/evaluate.md, "Label regimes") and the loop objective of each.
LABELS = {"kd": "kd", "soft": "soft", "hard": "ce"}
# The settings a repeat's result depends on, stored with it (repeats/seed-<s>.json): a rerun into the same
# --output with other values is refused instead of reporting the old result under the new settings.
# Not among them: the worker count and device (the protocol does not depend on them for a cached set),
# and where things are written.
RESULT_KEYS = (
    "distilled",
    "baseline",
    "real",
    "ipc",
    "test",
    "teacher",
    "teacher_arch",
    "student",
    "labels",
    "resolution",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "temperature",
    "crop_scale",
    "cutmix_alpha",
    "cutmix_p",
    "eval_every",
)
# What a stored repeat lacking a key was computed with (files written before the key existed).
_OLD_DEFAULTS = {"labels": "kd"}
# Test evaluations in a run when --eval-every is not given: one every epochs / 20 epochs.
EVALUATIONS_PER_RUN = 20


@dataclass(frozen=True)
class EvaluateConfig(harness.TrainRunFields):
    """Everything `python -m d3hr_ray.evaluate` needs. Field docs are the flags' help texts."""

    distilled: str | None = field(
        default=None,
        metadata={"help": "the training set: a distill output folder, or an ImageFolder/Parquet (local or s3://)"},
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "instead of --distilled: 'random-real' (--ipc random images per class of --real), 'herding' or "
            "'k-center' (--ipc per class chosen from the teacher's features) or 'full' (all of --real)"
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "a text file (local or s3://) naming integer labels of --real and --test in order, one a line: "
            "WebDataset .cls labels, Parquet labels without ClassLabel names (default: a classes.txt beside "
            "WebDataset shards, else the numbers)"
        },
    )
    real: str | None = field(default=None, metadata={"help": "the real training data for --baseline"})
    ipc: int | None = field(
        default=None, metadata={"help": "images per class for --baseline random-real, herding, k-center"}
    )
    test: str = field(
        default="digits:test", metadata={"help": "the real test set (ImageFolder, Parquet, 'digits:test')"}
    )
    labels: str = field(
        default="kd",
        metadata={
            "help": "targets: 'kd' (the teacher on every augmented batch, the paper's), 'soft' (the teacher's "
            "targets of each image, computed once) or 'hard' (the class labels, cross-entropy)"
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "a train_teacher folder, a state-dict file (.pth/.pt/.safetensors; then --teacher-arch), local "
            "or s3://, or torchvision:<model>[:<weights>] (e.g. torchvision:resnet18:IMAGENET1K_V1, from torch.hub's "
            "cache under TORCH_HOME); needed unless --labels hard (then it still names the classes, resolution and "
            "normalisation)"
        },
    )
    teacher_arch: str | None = field(
        default=None, metadata={"help": "the architecture of a bare --teacher weights file"}
    )
    student: str = field(
        default="conv3",
        metadata={
            "help": "student architecture (registry: conv3, resnet18, resnet18_modified, resnet50, resnet101, "
            "mobilenet_v2, efficientnet_b0, vgg11)"
        },
    )
    resolution: int | None = field(default=None, metadata={"help": "image side (default: the teacher's)"})
    epochs: int = field(
        default=400, metadata={"help": "epochs (docs/method.md: 300 ImageNet-1K and Tiny-ImageNet, 400 CIFAR)"}
    )
    batch_size: int = field(default=64, metadata={"help": "global batch size"})
    lr: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (default: the student's, docs/method.md)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, on weights only"})
    temperature: float = field(default=20.0, metadata={"help": "soft-label temperature T"})
    crop_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={"help": "RandomResizedCrop area range"})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta(a, a) parameter; 0 turns CutMix off"})
    cutmix_p: float = field(default=1.0, metadata={"help": "probability of CutMix per batch"})
    eval_every: int | None = field(
        default=None, metadata={"help": "epochs between test evaluations (default: epochs / 20)"}
    )
    repeats: int = field(default=3, metadata={"help": "runs with seeds seed, seed+1, ..."})
    seed: int = field(
        default=0, metadata={"help": "first seed (student init, order, augmentation, random-real subset)"}
    )
    output: str = field(
        default="eval-output", metadata={"help": "results.json, results.md and per-repeat results (local or s3://)"}
    )
    label: str | None = field(default=None, metadata={"help": "row label in results.md (default: from the inputs)"})
    name: str = field(
        default="d3hr-eval", metadata={"help": "run name prefix; rerunning with the same name and storage resumes"}
    )
    cache_gb: float = field(
        default=4.0,
        metadata={"help": "hold a data set in each worker's memory (uint8) when it fits in this many GiB; else stream"},
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "print what would be trained (images, classes, steps, student, teacher) from the listings and "
            "the teacher's metadata; no Ray, no training, nothing written"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        require(
            self,
            (self.distilled is None) != (self.baseline is None),
            "distilled",
            "or --baseline is needed (exactly one)",
        )
        require(self, self.labels in LABELS, "labels", f"must be one of {', '.join(LABELS)}")
        if self.baseline is not None:
            require(self, self.baseline in BASELINES, "baseline", f"must be one of {', '.join(BASELINES)}")
            require(self, self.real is not None, "real", "is needed with --baseline (the real training data)")
            if self.baseline in _CHOOSERS:
                require(
                    self,
                    isinstance(self.ipc, int) and self.ipc >= 1,
                    "ipc",
                    f"must be an integer >= 1 with --baseline {self.baseline}",
                )
        require(self, self.student in STUDENT_LRS, "student", f"must be one of {', '.join(STUDENT_LRS)}")
        if self.teacher_arch is not None:
            require(self, self.teacher_arch in STUDENT_LRS, "teacher_arch", f"must be one of {', '.join(STUDENT_LRS)}")
            require(
                self,
                not (self.teacher or "").startswith("torchvision:"),
                "teacher_arch",
                "is for a bare weights file; --teacher torchvision:<model> names its architecture",
            )
        require_positive_ints(self, "epochs", "batch_size", "repeats")
        if self.eval_every is not None:
            require(self, self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self, self.lr is None or self.lr > 0, "lr", "must be > 0")
        require(self, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self, self.temperature > 0, "temperature", "must be > 0")
        require(
            self,
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_scale",
            "must be two numbers 0 < a <= b <= 1",
        )
        require(
            self,
            self.cutmix_alpha >= 0 and 0 <= self.cutmix_p <= 1,
            "cutmix_alpha",
            "must be >= 0 (and --cutmix-p in [0, 1])",
        )
        require(self, self.cache_gb >= 0, "cache_gb", "must be >= 0")
        require(self, isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0")
        if self.resolution is not None:
            require(self, self.resolution >= 8, "resolution", "must be >= 8")
        require(
            self,
            self.teacher is not None or (self.labels == "hard" and self.baseline not in CORESET_RULES),
            "teacher",
            "is needed with --labels kd or soft and with --baseline herding or k-center",
        )

    @property
    def method(self) -> str:
        if self.baseline == "full":
            return "full real data"
        if self.baseline == "random-real":
            return f"random real, IPC {self.ipc}"
        if self.baseline is not None:
            return f"{self.baseline}, IPC {self.ipc}"
        return "distilled"


def _train_set(cfg: EvaluateConfig, names, k: int, r: int, seed: int, chooser):
    """(ray Dataset of classifier rows, description, inputs listed for it, chosen keys per class name or None).

    Nothing is decoded here: the listed count (an upper bound of the usable images) sizes the workers'
    cache, and the workers report how many images were usable.
    """
    from d3hr_ray.evaluation.data import distilled_location
    from d3hr_ray.evaluation.driver import as_classifier_rows, listed_rows, open_rows
    from d3hr_ray.workers.datasets import rows_dataset

    if cfg.baseline is None:
        src, ds, _ = open_rows(distilled_location(cfg.distilled), names=names, num_classes=k, resolution=r)
        # The classes the set holds (a distilled subset of the teacher's classes gives its IPC per class it has).
        present = sum(1 for n in src.listing.counts.values() if n)
        return ds, {"source": cfg.distilled, "classes": present}, listed_rows(src), None
    if cfg.baseline == "full":
        src, ds, _ = open_rows(
            cfg.real, names=names, num_classes=k, resolution=r, label_names=read_label_names(cfg.class_names)
        )
        return ds, {"source": cfg.real}, listed_rows(src), None
    # Neither read holds the whole set's images: the chooser reads labels and keys (random real) or streams
    # features (coresets), then the chosen images alone are read, from the shards that hold them.
    keys, short = chooser.keys(seed)
    if not keys:
        raise ValueError(f"--real {cfg.real}: no image of a class of the teacher to choose from")
    chosen: dict[int, list[str]] = {}
    per_class: dict[str, list] = {}
    for key, (label, shard) in sorted(keys.items()):
        chosen.setdefault(shard, []).append(key)
        per_class.setdefault(names[label], []).append([key, shard])
    shards = [s.narrowed(chosen[s.id]) for s in chooser.listing.shards if s.id in chosen]
    about = {"source": cfg.real, "selected": len(keys), "classes_with_fewer": {str(c): n for c, n in short.items()}}
    return as_classifier_rows(rows_dataset(shards), r), about, len(keys), per_class


class _Chooser:
    """The --ipc images per class a choosing baseline trains on, per repeat seed: {key: (label, shard id)}.

    random-real ranks every key by a seeded hash (labels and keys only, no image read); herding and
    k-center stream the teacher's features of every image once per run into a per-class spill on local
    disk, then choose from one class's features at a time (evaluation/coresets.py).
    """

    def __init__(self, cfg: EvaluateConfig, names, k: int, teacher_ref, spill_dir: str):
        from d3hr_ray.data.sources import list_source

        self.cfg, self.teacher_ref, self.spill_dir = cfg, teacher_ref, spill_dir
        self.listing = list_source(
            cfg.real, model_names=names, num_model_classes=k, label_names=read_label_names(cfg.class_names)
        )
        self.spill = None
        self.refused = 0

    def keys(self, seed: int) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
        """(chosen key -> (class id, shard id), class id -> how many it had when fewer than --ipc)."""
        from d3hr_ray.evaluation.coresets import select_coreset
        from d3hr_ray.evaluation.data import random_real_keys
        from d3hr_ray.workers.datasets import keys_dataset

        cfg = self.cfg
        if cfg.baseline == "random-real":
            return random_real_keys(keys_dataset(self.listing.shards).iter_batches(batch_format="numpy"), cfg.ipc, seed)
        spill = self._features()
        keys, short = {}, {}
        for c in spill.classes():
            values, feats = spill.load(c)
            for i in select_coreset(cfg.baseline, [v[0] for v in values], feats, cfg.ipc, seed, c):
                keys[values[i][0]] = (c, values[i][1])
            if len(values) < cfg.ipc:
                short[c] = len(values)
        return keys, short

    def _features(self):
        """The per-class spill of the teacher's features of every usable image of --real (computed once)."""
        if self.spill is None:
            import ray

            from d3hr_ray.evaluation.coresets import ClassSpill
            from d3hr_ray.evaluation.driver import feature_batches

            spill = ClassSpill(self.spill_dir)
            actors = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
            print(
                f"{self.cfg.baseline}: the teacher's features of {sum(self.listing.counts.values())} listed images",
                flush=True,
            )
            for b in feature_batches(self.listing.shards, self.teacher_ref, actors, self.cfg.torch_threads):
                ok = np.asarray(b["ok"], dtype=bool) & (np.asarray(b["label"]) >= 0)
                self.refused += int((~ok).sum())
                if ok.any():
                    spill.add(
                        np.asarray(b["label"])[ok],
                        b["feature"][ok],
                        [
                            [str(key), int(sh)]
                            for key, sh in zip(np.asarray(b["key"])[ok], np.asarray(b["shard"])[ok], strict=True)
                        ],
                    )
            self.spill = spill
        return self.spill


def _classes(cfg: EvaluateConfig):
    """(teacher model or None, meta {num_classes, class_names, resolution, mean, std, ...}) of this evaluation.

    A teacher folder gives its own meta; a bare weights file takes its classes from the test set; with
    --labels hard and no --teacher, the test set names the classes, the resolution is --resolution or the
    test images' size, and the normalisation is ImageNet's.
    """
    from d3hr_ray.data.sources import list_source
    from d3hr_ray.evaluation.protocol import IMAGENET_MEAN, IMAGENET_STD
    from d3hr_ray.evaluation.teacher import load_teacher, teacher_meta

    meta = teacher_meta(cfg.teacher) if cfg.teacher is not None else None
    if meta is not None:
        return load_teacher(cfg.teacher)
    test = list_source(
        cfg.test, model_names=None, num_model_classes=None, label_names=read_label_names(cfg.class_names)
    )
    names = [test.names[i] for i in sorted(test.names)]
    if cfg.teacher is None:
        r = cfg.resolution or test.native_size
        if not r:
            raise ValueError(f"--test {cfg.test}: no readable image to take the resolution from; pass --resolution")
        return None, {
            "num_classes": len(names),
            "class_names": names,
            "resolution": r,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        }
    teacher, meta = load_teacher(cfg.teacher, arch=cfg.teacher_arch, num_classes=len(names), resolution=cfg.resolution)
    return teacher, dict(meta, class_names=names)


def plan(cfg: EvaluateConfig) -> dict:
    """What `run` would train, from the listings and the teacher's metadata alone (no Ray, no weights loaded):
    {teacher, teacher_weights, classes, resolution, train, train_images, train_classes, test_images, student,
    labels, lr, epochs, batch_size, steps_per_epoch, steps, repeats}."""
    import math

    from d3hr_ray.data.sources import list_source
    from d3hr_ray.evaluation.data import distilled_location
    from d3hr_ray.evaluation.teacher import TORCHVISION, teacher_meta, torchvision_checkpoint, torchvision_weights

    labels = read_label_names(cfg.class_names)
    meta = teacher_meta(cfg.teacher) if cfg.teacher is not None else None
    test = list_source(
        cfg.test,
        model_names=meta["class_names"] if meta else None,
        num_model_classes=meta["num_classes"] if meta else None,
        label_names=labels,
    )
    names = meta["class_names"] if meta else [test.names[i] for i in sorted(test.names)]
    weights = None
    if cfg.teacher is not None and cfg.teacher.startswith(TORCHVISION):
        path = torchvision_checkpoint(torchvision_weights(cfg.teacher)[1])
        weights = f"{path} ({'present' if os.path.exists(path) else 'missing: downloaded at the start'})"
    train_uri = distilled_location(cfg.distilled) if cfg.baseline is None else cfg.real
    train = list_source(train_uri, model_names=names, num_model_classes=len(names), label_names=labels)
    counts = train.counts
    images = sum(min(n, cfg.ipc) if cfg.baseline in _CHOOSERS else n for n in counts.values())
    steps_per_epoch = math.ceil(images / cfg.batch_size)
    return {
        "teacher": cfg.teacher,
        "teacher_arch": (meta or {}).get("arch", cfg.teacher_arch),
        "teacher_weights": weights,
        "classes": len(names),
        "resolution": cfg.resolution or (meta or {}).get("resolution") or test.native_size,
        "train": f"{train_uri} ({cfg.method})",
        "train_images": images,
        "train_classes": sum(1 for n in counts.values() if n),
        "test_images": sum(test.counts.values()),
        "student": cfg.student,
        "labels": cfg.labels,
        "lr": cfg.lr or STUDENT_LRS[cfg.student],
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "steps": steps_per_epoch * cfg.epochs,
        "repeats": cfg.repeats,
    }


def format_plan(p: dict) -> str:
    """The dry run's lines."""
    teacher = "none (hard labels)" if p["teacher"] is None else f"{p['teacher']} ({p['teacher_arch']})"
    lines = [
        "plan (--dry-run: nothing trained, nothing written)",
        f"train     {p['train']}: {p['train_images']:,} images in {p['train_classes']:,} of {p['classes']:,} classes",
        f"test      {p['test_images']:,} images",
        f"student   {p['student']} at {p['resolution']} px, {p['labels']} labels, AdamW lr {p['lr']:g}",
        f"teacher   {teacher}",
    ]
    if p["teacher_weights"]:
        lines.append(f"          weights {p['teacher_weights']}")
    lines.append(
        f"steps     {p['epochs']:,} epochs x {p['steps_per_epoch']:,} batches of {p['batch_size']:,} = "
        f"{p['steps']:,} steps a repeat, {p['repeats']} repeat(s)"
    )
    return "\n".join(lines)


def _stored_settings(rec: dict, settings: dict) -> dict:
    """The settings a stored repeat was computed with (keys added since it was written: their old defaults)."""
    return {**_OLD_DEFAULTS, **rec.get("settings", settings)}


@dataclass(frozen=True)
class _Setup:
    """What every repeat of one evaluation shares, resolved once."""

    use_gpu: bool
    t_start: float
    meta: dict  # the teacher's (or the test set's) classes, resolution, normalisation
    k: int  # classes
    r: int  # image side
    objective: str  # the loop's objective for --labels
    teacher_ref: object  # ray.ObjectRef of (meta, state dict), or None
    test_ds: object
    n_test: int
    eval_every: int
    command: str | None

    @property
    def names(self) -> list[str]:
        return self.meta["class_names"]


def run(cfg: EvaluateConfig, command: str | None = None) -> dict:
    """Evaluate; returns the results.json content (and logs to MLflow with --mlflow)."""
    import ray

    from d3hr_ray.evaluation.driver import listed_rows, open_rows
    from d3hr_ray.storage.fs import OutputDir
    from d3hr_ray.training.classifier_loop import TEACHER_OBJECTIVES

    if cfg.dry_run:
        return {"plan": plan(cfg)}
    harness.use_train_v2()
    use_gpu = harness.start_ray(cfg.use_gpu)
    t_start = time.time()
    teacher, meta = _classes(cfg)
    k, r, objective = meta["num_classes"], cfg.resolution or meta["resolution"], LABELS[cfg.labels]
    teacher_ref = None
    if teacher is not None and (objective in TEACHER_OBJECTIVES or cfg.baseline in CORESET_RULES):
        teacher_ref = ray.put(
            (dict(meta, resolution=r), {n: t.detach().cpu() for n, t in teacher.state_dict().items()})
        )
    test_src, test_ds, _ = open_rows(
        cfg.test, names=meta["class_names"], num_classes=k, resolution=r, label_names=read_label_names(cfg.class_names)
    )
    n_test = listed_rows(test_src)  # sizes the cache; the images scored are counted by the workers
    if n_test == 0:
        raise ValueError(f"the test set ({cfg.test}) has no images of the teacher's classes")
    eval_every = cfg.eval_every or max(1, cfg.epochs // EVALUATIONS_PER_RUN)
    setup = _Setup(use_gpu, t_start, meta, k, r, objective, teacher_ref, test_ds, n_test, eval_every, command)
    out = OutputDir(cfg.output)
    finished = _finished_repeats(cfg, out, eval_every)  # a refused rerun stops here, before touching the MLflow run
    run = tracking.start(
        cfg.mlflow, out, "d3hr_ray.evaluate", cfg.name, asdict(cfg), experiment_flag=cfg.mlflow_experiment
    )
    try:
        results = _repeats(cfg, setup, out, run, finished)
    except BaseException as e:
        tracking.finish(run, e)
        raise
    tracking.log_metrics(run, {key: results[key] for key in ("top1_mean", "top1_std", "top5_mean", "top5_std")})
    for name in ("results.json", "results.md"):
        tracking.log_artifact(run, name, out.read(name))
    curves = learning_curves([(f"seed {x['seed']}", x["history"]) for x in results["per_repeat"]], results["label"])
    if curves is not None:
        tracking.log_artifact(run, "top1-by-epoch.png", curves)
    tracking.finish(run)
    return results


def _settings(cfg: EvaluateConfig, eval_every: int) -> dict:
    """The settings a repeat's numbers depend on, as results.json stores them."""
    return json.loads(json.dumps({**{key: getattr(cfg, key) for key in RESULT_KEYS}, "eval_every": eval_every}))


def _finished_repeats(cfg: EvaluateConfig, out, eval_every: int) -> dict[int, dict]:
    """{seed: record} of the repeats this output already holds; one computed with other settings is refused."""
    from d3hr_ray.storage.fs import read_bytes

    settings = _settings(cfg, eval_every)
    finished = {}
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        done = f"repeats/seed-{seed}.json"
        try:
            rec = json.loads(read_bytes(out.path(done)))
        except FileNotFoundError:
            continue
        stored = _stored_settings(rec, settings)
        differ = sorted(key for key in settings if stored.get(key) != settings[key])
        if differ:
            raise ValueError(
                f"{out.path(done)} holds a repeat computed with other settings ({', '.join(differ)} differ); "
                "use another --output, or delete that file to compute the repeat again"
            )
        finished[seed] = rec
    return finished


def _repeats(cfg: EvaluateConfig, setup: _Setup, out, run, finished: dict[int, dict]) -> dict:
    """Every repeat (a finished one as `finished` holds it, the others trained), then results.json and results.md."""
    import tempfile

    import ray
    import torch

    from d3hr_ray.evaluation.driver import fits_cache
    from d3hr_ray.training.classifier_loop import (
        TEACHER_OBJECTIVES,
        ClassifierLoopConfig,
        classifier_history,
        fit_classifier,
    )

    s, names, k, r, objective, eval_every = setup, setup.names, setup.k, setup.r, setup.objective, setup.eval_every
    teacher_ref, use_gpu, meta = setup.teacher_ref, setup.use_gpu, setup.meta
    epochs = cfg.epochs
    settings = _settings(cfg, eval_every)
    repeats = []
    with tempfile.TemporaryDirectory(prefix="d3hr-eval-") as scratch:
        chooser = _Chooser(cfg, names, k, teacher_ref, scratch) if cfg.baseline in _CHOOSERS else None
        for rep in range(cfg.repeats):
            seed = cfg.seed + rep
            done = f"repeats/seed-{seed}.json"
            rec = finished.get(seed)
            if rec is not None:
                repeats.append(rec)
                print(
                    f"repeat {rep + 1}/{cfg.repeats} (seed {seed}): already done, top-1 {rec['best_top1']:.4f}",
                    flush=True,
                )
                continue
            t0 = time.time()
            train_ds, about, n_train, chosen = _train_set(cfg, names, k, r, seed, chooser)
            if n_train == 0:
                raise ValueError(f"the training set ({about['source']}) has no images of the teacher's classes")
            if chosen is not None:  # what this repeat trains on, for `diagnose sets` and for the reader
                about["keys_file"] = out.write_bytes(
                    f"sets/seed-{seed}.json",
                    json.dumps(
                        {"baseline": cfg.baseline, "source": cfg.real, "ipc": cfg.ipc, "seed": seed, "keys": chosen},
                        indent=1,
                    ).encode(),
                )
            loop = ClassifierLoopConfig(
                objective=objective,
                arch=cfg.student,
                num_classes=k,
                resolution=r,
                epochs=epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr or STUDENT_LRS[cfg.student],
                weight_decay=cfg.weight_decay,
                crop_scale=tuple(cfg.crop_scale),
                eval_every=eval_every,
                mean=tuple(meta["mean"]),
                std=tuple(meta["std"]),
                seed=seed,
                cache_train=fits_cache(n_train, r, cfg.cache_gb),
                cache_test=fits_cache(s.n_test, r, cfg.cache_gb),
                cutmix_alpha=cfg.cutmix_alpha,
                cutmix_p=cfg.cutmix_p,
                temperature=cfg.temperature,
                teacher_ref=teacher_ref if objective in TEACHER_OBJECTIVES else None,
                torch_threads=cfg.torch_threads,
                tracking=run,
                metric_prefix=f"seed-{seed}/",
            )
            result = fit_classifier(
                loop, train_ds, s.test_ds, harness.RunSpec.of(cfg, use_gpu=use_gpu, name=f"{cfg.name}-seed{seed}")
            )
            history, best = classifier_history(result)
            rec = {
                "seed": seed,
                "best_top1": best["top1"],
                "best_top5": best["top5"],
                "best_epoch": best["epoch"],
                "final_top1": history[-1]["top1"],
                "train_images": history[-1]["train_images"],
                "train_refused": history[-1]["train_refused"],
                "test_images": history[-1]["test_images"],
                "train_set": about,
                "history": history,
                "settings": settings,
                "wall_s": time.time() - t0,
            }
            out.write_bytes(done, json.dumps(rec, indent=2).encode())
            repeats.append(rec)
            print(
                f"repeat {rep + 1}/{cfg.repeats} (seed {seed}): best top-1 {best['top1']:.4f} at epoch {best['epoch']}",
                flush=True,
            )

    top1 = np.array([x["best_top1"] for x in repeats]) * 100
    top5 = np.array([x["best_top5"] for x in repeats]) * 100
    label = cfg.label or (cfg.distilled if cfg.baseline is None else cfg.method)
    if cfg.baseline is None:  # images per class the distilled set holds (files from before "classes": the teacher's)
        ipc = round(repeats[0]["train_images"] / (repeats[0]["train_set"].get("classes") or k), 2)
    else:
        ipc = cfg.ipc if cfg.baseline in _CHOOSERS else None
    results = {
        "label": label,
        "method": cfg.method,
        "labels": cfg.labels,
        "student": cfg.student,
        "teacher": cfg.teacher,
        "teacher_test_top1": meta.get("test_top1"),
        "ipc": ipc,
        "repeats": len(repeats),
        "top1_mean": float(top1.mean()),
        "top1_std": float(top1.std()),
        "top5_mean": float(top5.mean()),
        "top5_std": float(top5.std()),
        "per_repeat": repeats,
        "config": asdict(cfg),
        "command": s.command,
        "device": "GPU" if use_gpu else "CPU",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "wall_s": time.time() - s.t_start,
    }
    out.write_bytes("results.json", json.dumps(results, indent=2).encode())
    out.write_bytes("results.md", (table_row(results) + "\n").encode())
    return results


def table_row(res: dict) -> str:
    """| label | student | labels | IPC | top-1 mean +- std | top-5 | repeats | `command` |"""
    ipc = "all" if res["ipc"] is None else f"{res['ipc']:g}"
    cmd = f"`{res['command']}`" if res.get("command") else ""
    return (
        f"| {res['label']} | {res['student']} | {res.get('labels', 'kd')} | {ipc} | {res['top1_mean']:.1f} ± "
        f"{res['top1_std']:.1f} | "
        f"{res['top5_mean']:.1f} ± {res['top5_std']:.1f} | {res['repeats']} | {cmd} |"
    )


def _report(cfg: EvaluateConfig, res: dict) -> int:
    if "plan" in res:
        print(format_plan(res["plan"]))
        return 0
    print(
        f"{res['method']}, {res['student']}, {res['labels']} labels: top-1 {res['top1_mean']:.2f} ± "
        f"{res['top1_std']:.2f} over {res['repeats']} repeat(s)"
    )
    print(table_row(res))
    print(f"output: {cfg.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    harness.use_train_v2()  # before anything imports ray.train
    args = sys.argv[1:] if argv is None else list(argv)
    command = "python -m d3hr_ray.evaluate " + shlex.join(args)
    return main_for(
        args,
        cls=EvaluateConfig,
        run=lambda cfg: run(cfg, command=command),
        report=_report,
        prog="python -m d3hr_ray.evaluate",
        description=__doc__,
    )


if __name__ == "__main__":
    raise SystemExit(main())
