"""Driver-side pieces shared by `train_teacher` and `evaluate`: datasets of classifier rows, the cache rule, and
the teacher's features streamed for the coreset baselines (a Ray Train run of the loop: `training.classifier_loop`)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from d3hr_ray.data.listing import Shard
from d3hr_ray.data.sources import list_source
from d3hr_ray.evaluation.data import classifier_rows
from d3hr_ray.evaluation.teacher import features_and_logits
from d3hr_ray.training.protocol import normalize
from d3hr_ray.training.students import build_student
from d3hr_ray.workers.datasets import Source, open_listing, rows_dataset

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "TeacherFeatures",
    "as_classifier_rows",
    "feature_batches",
    "listed_rows",
    "open_rows",
]

# Rows per call of a TeacherFeatures actor (memory only: the features do not depend on it, eval mode).
FEATURE_BATCH_ROWS = 256


def open_rows(
    uri: str,
    *,
    names: list[str] | None,
    num_classes: int | None,
    resolution: int | None,
    label_names: list[str] | None = None,
) -> tuple[Source, Dataset, int]:
    """(Source, ray Dataset of classifier rows at R, R) for any source the distill job reads.

    R defaults to the source's native image size. Classes map to `names` (the teacher's) by name, else by position.
    """
    src = open_listing(list_source(uri, model_names=names, num_model_classes=num_classes, label_names=label_names))
    r = resolution or src.native_size
    if not r:
        raise FileNotFoundError(f"{uri}: no readable image to take the resolution from; pass --resolution")
    return src, as_classifier_rows(src.dataset, r), r


def as_classifier_rows(dataset: Dataset, resolution: int) -> Dataset:
    """A source's {item, label, key} rows -> {image uint8 (3, R, R), label, ok} (see `classifier_rows`)."""
    rows = dataset.map_batches(functools.partial(classifier_rows, resolution=resolution), batch_format="numpy")
    return rows.drop_columns(["reason"])


def listed_rows(src: Source) -> int:
    """Inputs a source's listing holds for its classes (files, Parquet rows): what a worker's cache may have to
    hold, known without decoding an image. The usable count (refused inputs left out) comes from the workers."""
    return sum(src.listing.counts.values())


class TeacherFeatures:
    """Ray Data actor: source rows {item, label, key, shard, reason} -> the teacher's penultimate features.

    Each image is read at the teacher's resolution and normalisation, un-augmented, as a student sees it.
    Emits {label, key, shard, ok, feature (F,) float32}; a refused row keeps its place with ok False (and
    a zero feature), so that the caller counts it.
    """

    def __init__(self, teacher_ref: list[ray.ObjectRef], threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        meta, state = ray.get(teacher_ref[0])
        self.meta = meta
        self.model = build_student(meta["arch"], meta["num_classes"], meta["resolution"])
        self.model.load_state_dict(state)
        self.model.eval().requires_grad_(False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = classifier_rows(batch, resolution=self.meta["resolution"])
        ok = rows["ok"] & (np.asarray(batch["reason"], dtype=object) == "")
        x = normalize(torch.from_numpy(np.ascontiguousarray(rows["image"][ok])), self.meta["mean"], self.meta["std"])
        f, _ = features_and_logits(self.model, x)  # (n_ok, F)
        feats = np.zeros((len(ok), f.shape[1]), dtype=np.float32)
        feats[ok] = f.numpy()
        return {
            "label": rows["label"],
            "key": np.asarray(batch["key"], dtype=object),
            "shard": np.asarray(batch["shard"]),
            "ok": ok,
            "feature": feats,
        }


def feature_batches(
    shards: list[Shard], teacher_ref: ray.ObjectRef, actors: int, threads: int | None = None
) -> Iterable[dict[str, Any]]:
    """Batches {label, key, shard, ok, feature} of every row of `shards` through the teacher (`TeacherFeatures`),
    on an actor pool of up to `actors` CPU actors; streamed, so the driver holds one batch at a time."""
    ds = rows_dataset(shards).map_batches(
        TeacherFeatures,
        fn_constructor_args=([teacher_ref], threads),
        batch_size=FEATURE_BATCH_ROWS,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
    )
    return ds.iter_batches(batch_size=None, batch_format="numpy")
