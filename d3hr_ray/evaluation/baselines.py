"""The training set of one `evaluate` repeat: the distilled set, all of --real, or --ipc images per class chosen.

    train_set(...)   the repeat's Ray Dataset of classifier rows, what it is (`TrainSet`), the inputs listed for it,
                     and the chosen keys per class name (a choosing baseline)
    Chooser          random-real, herding, k-center: the keys each repeat's seed chooses

Nothing is decoded here: the listed count (an upper bound of the usable images) sizes the workers' cache, and the
workers report how many images were usable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import ray

from d3hr_ray.data.listing import Listing
from d3hr_ray.data.sources import list_source, read_label_names
from d3hr_ray.evaluation.config import CHOOSERS, EvaluateConfig
from d3hr_ray.evaluation.coresets import ClassSpill, select_coreset
from d3hr_ray.evaluation.data import distilled_location, random_real_keys
from d3hr_ray.evaluation.driver import as_classifier_rows, feature_batches, listed_rows, open_rows
from d3hr_ray.evaluation.records import TrainSet
from d3hr_ray.workers.datasets import keys_dataset, rows_dataset

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["ChosenKeys", "Chooser", "train_set"]

# A choosing baseline's keys as sets/seed-<s>.json stores them: class name -> [[key, shard id], ...].
ChosenKeys = dict[str, list[list[str | int]]]


class Chooser:
    """The --ipc images per class a choosing baseline trains on, per repeat seed: {key: (label, shard id)}.

    random-real ranks every key by a seeded hash (labels and keys only, no image read); herding and
    k-center stream the teacher's features of every image once per run into a per-class spill on local
    disk, then choose from one class's features at a time (evaluation/coresets.py).
    """

    def __init__(
        self, cfg: EvaluateConfig, names: list[str], k: int, teacher_ref: ray.ObjectRef | None, spill_dir: str
    ):
        if cfg.baseline not in CHOOSERS or cfg.ipc is None:
            raise ValueError(f"--baseline {cfg.baseline} chooses no images (choosers: {', '.join(CHOOSERS)})")
        self.cfg, self.rule, self.ipc = cfg, cfg.baseline, cfg.ipc
        self.teacher_ref, self.spill_dir = teacher_ref, spill_dir
        self.listing: Listing = list_source(
            cfg.train_uri, model_names=names, num_model_classes=k, label_names=read_label_names(cfg.class_names)
        )
        self.spill: ClassSpill | None = None
        self.refused = 0

    def keys(self, seed: int) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
        """(chosen key -> (class id, shard id), class id -> how many it had when fewer than --ipc)."""
        if self.rule == "random-real":
            batches = keys_dataset(self.listing.shards).iter_batches(batch_format="numpy")
            return random_real_keys(batches, self.ipc, seed)
        spill = self._features()
        keys, short = {}, {}
        for c in spill.classes():
            values, feats = spill.load(c)
            for i in select_coreset(self.rule, [v[0] for v in values], feats, self.ipc, seed, c):
                keys[values[i][0]] = (c, values[i][1])
            if len(values) < self.ipc:
                short[c] = len(values)
        return keys, short

    def _features(self) -> ClassSpill:
        """The per-class spill of the teacher's features of every usable image of --real (computed once)."""
        if self.spill is None:
            if self.teacher_ref is None:
                raise ValueError(f"--baseline {self.rule} chooses from the teacher's features: it needs --teacher")
            spill = ClassSpill(self.spill_dir)
            actors = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
            print(
                f"{self.rule}: the teacher's features of {sum(self.listing.counts.values())} listed images", flush=True
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


def train_set(
    cfg: EvaluateConfig, names: list[str], k: int, r: int, seed: int, chooser: Chooser | None
) -> tuple[Dataset, TrainSet, int, ChosenKeys | None]:
    """(Ray Dataset of classifier rows, what it is, inputs listed for it, chosen keys per class name or None).

    Args:
        names: the teacher's class names (K of them, k); r: the image side; seed: the repeat's;
        chooser: for a choosing baseline (--baseline random-real, herding, k-center), else None.
    """
    if cfg.baseline is None:
        src, ds, _ = open_rows(distilled_location(cfg.train_uri), names=names, num_classes=k, resolution=r)
        # The classes the set holds (a distilled subset of the teacher's classes gives its IPC per class it has).
        present = sum(1 for n in src.listing.counts.values() if n)
        return ds, {"source": cfg.distilled, "classes": present}, listed_rows(src), None
    if cfg.baseline == "full":
        src, ds, _ = open_rows(
            cfg.train_uri, names=names, num_classes=k, resolution=r, label_names=read_label_names(cfg.class_names)
        )
        return ds, {"source": cfg.real}, listed_rows(src), None
    if chooser is None:
        raise ValueError(f"--baseline {cfg.baseline}: train_set needs the run's Chooser")
    # Neither read holds the whole set's images: the chooser reads labels and keys (random real) or streams
    # features (coresets), then the chosen images alone are read, from the shards that hold them.
    keys, short = chooser.keys(seed)
    if not keys:
        raise ValueError(f"--real {cfg.real}: no image of a class of the teacher to choose from")
    chosen: dict[int, list[str]] = {}
    per_class: ChosenKeys = {}
    for key, (label, shard) in sorted(keys.items()):
        chosen.setdefault(shard, []).append(key)
        per_class.setdefault(names[label], []).append([key, shard])
    shards = [s.narrowed(chosen[s.id]) for s in chooser.listing.shards if s.id in chosen]
    about: TrainSet = {
        "source": cfg.real,
        "selected": len(keys),
        "classes_with_fewer": {str(c): n for c, n in short.items()},
    }
    return as_classifier_rows(rows_dataset(shards), r), about, len(keys), per_class
