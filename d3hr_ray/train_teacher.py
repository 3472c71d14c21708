"""`python -m d3hr_ray.train_teacher`: a classifier on the full real data, the teacher of D3HR's evaluation.

Cross-entropy on the true labels with RandomResizedCrop (--crop-scale) + flip, AdamW (weight decay on
weights only), cosine schedule; Ray Train (TorchTrainer, DDP over --num-workers, a checkpoint at every
evaluation, rerunning the same command resumes). Writes a teacher folder (model.safetensors,
teacher.json with the architecture, classes, resolution, normalisation and test accuracy) that
`evaluate --teacher` reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from d3hr_ray import tracking
from d3hr_ray.cli import main_for
from d3hr_ray.data.listing import CLASS_NAMES_HELP
from d3hr_ray.data.sources import read_label_names
from d3hr_ray.diagnose.figure import learning_curves
from d3hr_ray.evaluation.choices import STUDENT_LRS
from d3hr_ray.flags import require, require_positive_ints
from d3hr_ray.training import harness

__all__ = ["TeacherConfig", "main", "run"]


@dataclass(frozen=True)
class TeacherConfig(harness.TrainRunFields):
    """Everything `python -m d3hr_ray.train_teacher` needs. Field docs are the flags' help texts."""

    data: str = field(
        default="digits:train",
        metadata={"help": "real training images: ImageFolder, Parquet (local or s3://), 'digits' or 'digits:train'"},
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": CLASS_NAMES_HELP},
    )
    test: str | None = field(
        default=None, metadata={"help": "real test images scored at every evaluation (default: none)"}
    )
    output: str = field(default="teacher", metadata={"help": "teacher folder (local or s3://)"})
    arch: str = field(default="conv3", metadata={"help": "architecture from the student registry"})
    resolution: int | None = field(default=None, metadata={"help": "image side (default: the data's)"})
    epochs: int = field(default=30, metadata={"help": "epochs"})
    batch_size: int = field(default=128, metadata={"help": "global batch size"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate (default: the architecture's)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on weights only"})
    crop_scale: tuple[float, float] = field(default=(0.5, 1.0), metadata={"help": "RandomResizedCrop area range"})
    eval_every: int = field(default=5, metadata={"help": "epochs between test evaluations and checkpoints"})
    name: str = field(
        default="d3hr-teacher", metadata={"help": "run name; rerunning with the same name and storage resumes"}
    )
    cache_gb: float = field(
        default=4.0,
        metadata={
            "help": "hold the data in each worker's memory (uint8) when it fits in this many GiB; else stream shards"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for initialisation, order and augmentation"})

    def __post_init__(self):
        super().__post_init__()
        require(self, self.arch in STUDENT_LRS, "arch", f"must be one of {', '.join(STUDENT_LRS)}")
        require_positive_ints(self, "epochs", "batch_size", "eval_every")
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


def run(cfg: TeacherConfig) -> dict:
    """Train; returns {"output", "best", "history", "meta"}."""
    from d3hr_ray.evaluation.driver import listed_rows, open_rows
    from d3hr_ray.storage.fs import OutputDir

    harness.use_train_v2()
    use_gpu = harness.start_ray(cfg.use_gpu)
    t0 = time.time()
    src, train_ds, r = open_rows(
        cfg.data, names=None, num_classes=None, resolution=cfg.resolution, label_names=read_label_names(cfg.class_names)
    )
    names = [src.names[i] for i in sorted(src.names)]
    if cfg.test:
        test_src, test_ds, _ = open_rows(
            cfg.test, names=names, num_classes=len(names), resolution=r, label_names=read_label_names(cfg.class_names)
        )
        n_test = listed_rows(test_src)
    else:
        test_ds, n_test = train_ds.limit(0), 0
    # Listed inputs (no decoding pass over the data before training): they size the workers' cache;
    # the usable images are counted by the workers and reported with every evaluation.
    n_train = listed_rows(src)
    if n_train == 0:
        raise ValueError(f"the training set ({cfg.data}) lists no images")
    out = OutputDir(cfg.output)
    run = tracking.start(
        cfg.mlflow, out, "d3hr_ray.train_teacher", cfg.name, asdict(cfg), experiment_flag=cfg.mlflow_experiment
    )
    try:
        result = _train(cfg, run, out, use_gpu, t0, names, r, train_ds, test_ds, n_train, n_test)
    except BaseException as e:
        tracking.finish(run, e)
        raise
    tracking.log_artifact(run, "teacher.json", out.read("teacher.json"))
    curves = learning_curves([(cfg.name, result["history"])], f"teacher {cfg.arch} on {cfg.data}")
    if curves is not None:
        tracking.log_artifact(run, "top1-by-epoch.png", curves)
    tracking.finish(run)
    return result


def _train(cfg: TeacherConfig, run, out, use_gpu, t0, names, r, train_ds, test_ds, n_train, n_test) -> dict:
    """The Ray Train run of the classifier loop (cross-entropy, no CutMix), then the teacher folder."""
    from safetensors.torch import load_file

    from d3hr_ray.evaluation.driver import fits_cache
    from d3hr_ray.evaluation.protocol import IMAGENET_MEAN, IMAGENET_STD
    from d3hr_ray.evaluation.students import build_student
    from d3hr_ray.evaluation.teacher import save_teacher
    from d3hr_ray.training.classifier_loop import ClassifierLoopConfig, classifier_history, fit_classifier

    loop = ClassifierLoopConfig(
        objective="ce",
        arch=cfg.arch,
        num_classes=len(names),
        resolution=r,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr or STUDENT_LRS[cfg.arch],
        weight_decay=cfg.weight_decay,
        crop_scale=tuple(cfg.crop_scale),
        eval_every=cfg.eval_every,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        seed=cfg.seed,
        cache_train=fits_cache(n_train, r, cfg.cache_gb),
        cache_test=fits_cache(n_test, r, cfg.cache_gb),
        cutmix_alpha=0.0,
        cutmix_p=0.0,
        temperature=1.0,  # hard labels, no CutMix
        torch_threads=cfg.torch_threads,
        tracking=run,
    )
    result = fit_classifier(loop, train_ds, test_ds, harness.RunSpec.of(cfg, use_gpu=use_gpu))
    history, best = classifier_history(result)
    model = build_student(cfg.arch, len(names), r)
    with result.checkpoint.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    last = history[-1]
    meta = {
        "arch": cfg.arch,
        "num_classes": len(names),
        "class_names": names,
        "resolution": r,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "test_top1": last["top1"] if cfg.test else None,
        "test_top5": last["top5"] if cfg.test else None,
        "train_images": last["train_images"],
        "train_refused": last["train_refused"],
        "test_images": last["test_images"],
        "data": cfg.data,
        "test": cfg.test,
        "config": asdict(cfg),
        "history": history,
        "wall_s": time.time() - t0,
    }
    save_teacher(out, model, meta)
    return {"output": out.uri, "best": best, "history": history, "meta": meta}


def _report(cfg: TeacherConfig, out: dict) -> int:
    m = out["meta"]
    if m["test_top1"] is not None:
        print(
            f"teacher: {m['arch']} test top-1 {m['test_top1']:.4f} (top-5 {m['test_top5']:.4f}) on "
            f"{m['test_images']} images"
        )
    print(f"output: {out['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    harness.use_train_v2()  # before anything imports ray.train
    return main_for(
        argv, cls=TeacherConfig, run=run, report=_report, prog="python -m d3hr_ray.train_teacher", description=__doc__
    )


if __name__ == "__main__":
    raise SystemExit(main())
