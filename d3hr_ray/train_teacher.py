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
from typing import TYPE_CHECKING, Any

from d3hr_ray import tracking
from d3hr_ray.cli import main_for
from d3hr_ray.data.listing import CLASS_NAMES_HELP
from d3hr_ray.data.sources import read_label_names
from d3hr_ray.diagnose.figure import learning_curves
from d3hr_ray.evaluation.config import DATA_KINDS
from d3hr_ray.flags import require, require_positive_ints
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training import harness
from d3hr_ray.training.choices import STUDENT_LRS

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["TeacherConfig", "main", "run"]


@dataclass(frozen=True)
class TeacherConfig(harness.ClassifierRunFields):
    """Everything `python -m d3hr_ray.train_teacher` needs. Field docs are the flags' help texts.

    The loop's flags (resolution, epochs, batch size, lr, weight decay, crop scale, cache, seed) are evaluate's
    too: `harness.ClassifierRunFields`, whose defaults are this job's.
    """

    data: str = field(
        default="digits:train",
        metadata={"help": f"real training images: {DATA_KINDS}, or 'digits' or 'digits:train'"},
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": CLASS_NAMES_HELP},
    )
    test: str | None = field(
        default=None,
        metadata={
            "help": f"real test images scored at every evaluation: {DATA_KINDS}, or 'digits:test' (default: none)"
        },
    )
    output: str = field(default="teacher", metadata={"help": "teacher folder (local or s3://)"})
    arch: str = field(default="conv3", metadata={"help": "architecture from the student registry"})
    eval_every: int = field(default=5, metadata={"help": "epochs between test evaluations and checkpoints"})
    name: str = field(
        default="d3hr-teacher", metadata={"help": "run name; rerunning with the same name and storage resumes"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, self.arch in STUDENT_LRS, "arch", f"must be one of {', '.join(STUDENT_LRS)}")
        require_positive_ints(self, "eval_every")


def run(cfg: TeacherConfig) -> dict[str, Any]:
    """Train; returns {"output", "best", "history", "meta"}."""
    # Torch and Ray load here, not when this module is imported: the job's flags parse and --help prints without them.
    from d3hr_ray.evaluation.driver import listed_rows, open_rows

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
    with tracking.tracked(
        cfg.mlflow, out, "d3hr_ray.train_teacher", cfg.name, asdict(cfg), experiment_flag=cfg.mlflow_experiment
    ) as mlflow_run:
        result = _train(cfg, mlflow_run, out, use_gpu, t0, names, r, train_ds, test_ds, n_train, n_test)
        tracking.log_artifact(mlflow_run, "teacher.json", out.read("teacher.json"))
        curves = learning_curves([(cfg.name, result["history"])], f"teacher {cfg.arch} on {cfg.data}")
        if curves is not None:
            tracking.log_artifact(mlflow_run, "top1-by-epoch.png", curves)
    return result


def _train(
    cfg: TeacherConfig,
    mlflow_run: tracking.MLflowRun | None,
    out: OutputDir,
    use_gpu: bool,
    t0: float,
    names: list[str],
    r: int,
    train_ds: Dataset,
    test_ds: Dataset,
    n_train: int,
    n_test: int,
) -> dict[str, Any]:
    """The Ray Train run of the classifier loop (cross-entropy, no CutMix), then the teacher folder."""
    # Torch loads here, not when this module is imported (see `run`).
    from safetensors.torch import load_file

    from d3hr_ray.evaluation.teacher import save_teacher
    from d3hr_ray.training.classifier_loop import ClassifierLoopConfig, classifier_history, fit_classifier
    from d3hr_ray.training.protocol import IMAGENET_MEAN, IMAGENET_STD
    from d3hr_ray.training.students import build_student

    loop = ClassifierLoopConfig.of(
        cfg,
        objective="ce",
        arch=cfg.arch,
        num_classes=len(names),
        resolution=r,
        eval_every=cfg.eval_every,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        seed=cfg.seed,
        n_train=n_train,
        n_test=n_test,
        tracking=mlflow_run,
    )  # hard labels, no CutMix: the defaults (cutmix_alpha 0, temperature 1)
    result = fit_classifier(loop, train_ds, test_ds, harness.RunSpec.of(cfg, use_gpu=use_gpu))
    history, best = classifier_history(result)
    model = build_student(cfg.arch, len(names), r)
    with harness.last_checkpoint(result).as_directory() as d:
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


def _report(cfg: TeacherConfig, out: dict[str, Any]) -> int:
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
