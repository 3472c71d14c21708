"""`evaluate --dry-run`: what a run would train, from the listings and the teacher's metadata alone (no Ray, no
weights loaded, nothing written)."""

from __future__ import annotations

import math
import os

from d3hr_ray.data.sources import list_source, read_label_names
from d3hr_ray.evaluation.config import CHOOSERS, EvaluateConfig
from d3hr_ray.evaluation.data import distilled_location
from d3hr_ray.evaluation.records import EvaluationPlan
from d3hr_ray.evaluation.teacher import TORCHVISION, teacher_meta, torchvision_checkpoint, torchvision_weights
from d3hr_ray.training.choices import STUDENT_LRS

__all__ = ["plan"]


def plan(cfg: EvaluateConfig) -> EvaluationPlan:
    """The plan of `cfg`: the training and test sets' listed images, the student, the teacher, the steps."""
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
    train_uri = distilled_location(cfg.train_uri) if cfg.baseline is None else cfg.train_uri
    train = list_source(train_uri, model_names=names, num_model_classes=len(names), label_names=labels)
    counts = train.counts
    if cfg.baseline in CHOOSERS and cfg.ipc is not None:
        images = sum(min(n, cfg.ipc) for n in counts.values())
    else:
        images = sum(counts.values())
    steps_per_epoch = math.ceil(images / cfg.batch_size)
    return EvaluationPlan(
        teacher=cfg.teacher,
        teacher_arch=(meta or {}).get("arch", cfg.teacher_arch),
        teacher_weights=weights,
        classes=len(names),
        resolution=cfg.resolution or (meta or {}).get("resolution") or test.native_size,
        train=f"{train_uri} ({cfg.method})",
        train_images=images,
        train_classes=sum(1 for n in counts.values() if n),
        test_images=sum(test.counts.values()),
        student=cfg.student,
        labels=cfg.labels,
        lr=cfg.lr or STUDENT_LRS[cfg.student],
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        steps=steps_per_epoch * cfg.epochs,
        repeats=cfg.repeats,
    )
