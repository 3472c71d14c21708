"""The repeats of one `evaluate` run: what they share, running one, storing them, summarising them.

prepare(cfg, use_gpu, command)   -> Setup: the classes and resolution, the teacher (in Ray's object store),
                                 the test set, the evaluation interval, resolved once for every repeat
RepeatStore                      repeats/seed-<s>.json and sets/seed-<s>.json under --output: the finished
                                 repeats (one computed with other settings is refused), writing a repeat
run_repeat(...)                  one repeat: its training set, the classifier loop on Ray Train -> RepeatResult
summarise(cfg, setup, repeats)   the repeats' mean and std of the best top-1 and top-5 -> EvaluationResults
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from d3hr_ray.data.sources import list_source, read_label_names
from d3hr_ray.evaluation.baselines import Chooser, ChosenKeys, train_set
from d3hr_ray.evaluation.config import CHOOSERS, LABELS, EvaluateConfig
from d3hr_ray.evaluation.driver import listed_rows, open_rows
from d3hr_ray.evaluation.records import EvaluationResults, JSONObject, RepeatResult
from d3hr_ray.evaluation.teacher import load_teacher, teacher_meta
from d3hr_ray.storage.fs import OutputDir, read_bytes
from d3hr_ray.training import harness
from d3hr_ray.training.choices import CORESET_RULES
from d3hr_ray.training.classifier_loop import (
    TEACHER_OBJECTIVES,
    ClassifierLoopConfig,
    classifier_history,
    fit_classifier,
)
from d3hr_ray.training.protocol import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from ray.data import Dataset

    from d3hr_ray.tracking import MLflowRun

__all__ = ["RepeatStore", "Setup", "prepare", "run_repeat", "summarise"]


@dataclass(frozen=True)
class Setup:
    """What every repeat of one evaluation shares, resolved once."""

    use_gpu: bool
    t_start: float  # time.time() at the start, for results.json's wall_s
    meta: dict[str, Any]  # the teacher's (or the test set's): num_classes, class_names, resolution, mean, std, ...
    k: int  # classes
    r: int  # image side
    objective: str  # the loop's objective for --labels
    teacher_ref: ray.ObjectRef | None  # of (meta, state dict), when the loop or a coreset needs the teacher
    test_ds: Dataset  # classifier rows of --test
    n_test: int  # test inputs listed (sizes the cache; the images scored are counted by the workers)
    eval_every: int
    command: str | None

    @property
    def names(self) -> list[str]:
        return self.meta["class_names"]


def _classes(cfg: EvaluateConfig) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """(teacher model or None, meta {num_classes, class_names, resolution, mean, std, ...}) of this evaluation.

    A teacher folder gives its own meta; a bare weights file takes its classes from the test set; with
    --labels hard and no --teacher, the test set names the classes, the resolution is --resolution or the
    test images' size, and the normalisation is ImageNet's.
    """
    if cfg.teacher is not None and teacher_meta(cfg.teacher) is not None:
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


def prepare(cfg: EvaluateConfig, use_gpu: bool, command: str | None) -> Setup:
    """The classes, the teacher put in Ray's object store (when the loop or a coreset needs it), the test set."""
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
    n_test = listed_rows(test_src)
    if n_test == 0:
        raise ValueError(f"the test set ({cfg.test}) has no images of the teacher's classes")
    eval_every = cfg.eval_every_or_default()
    return Setup(use_gpu, t_start, meta, k, r, objective, teacher_ref, test_ds, n_test, eval_every, command)


class RepeatStore:
    """The repeats of one --output: repeats/seed-<s>.json (a RepeatResult each), sets/seed-<s>.json (chosen keys)."""

    def __init__(self, out: OutputDir, settings: JSONObject):
        """`settings`: this run's (`EvaluateConfig.result_settings`); a stored repeat must have the same."""
        self.out, self.settings = out, settings

    @staticmethod
    def _name(seed: int) -> str:
        return f"repeats/seed-{seed}.json"

    def finished(self, seeds: range) -> dict[int, RepeatResult]:
        """{seed: repeat} of the repeats this output already holds; one computed with other settings is refused
        (ValueError naming the settings that differ). A repeat from before settings were stored is taken as is."""
        found = {}
        for seed in seeds:
            try:
                rec = RepeatResult.from_json(read_bytes(self.out.path(self._name(seed))))
            except FileNotFoundError:
                continue
            stored = rec.settings if rec.settings is not None else self.settings
            differ = sorted(key for key in self.settings if stored.get(key) != self.settings[key])
            if differ:
                raise ValueError(
                    f"{self.out.path(self._name(seed))} holds a repeat computed with other settings "
                    f"({', '.join(differ)} differ); use another --output, or delete that file to compute the repeat "
                    "again"
                )
            found[seed] = rec
        return found

    def write(self, rec: RepeatResult) -> None:
        self.out.write_bytes(self._name(rec.seed), rec.to_json())

    def write_chosen(self, cfg: EvaluateConfig, seed: int, chosen: ChosenKeys) -> str:
        """Write sets/seed-<s>.json, the keys a choosing baseline trained on (for `diagnose sets`); returns its path."""
        about = {"baseline": cfg.baseline, "source": cfg.real, "ipc": cfg.ipc, "seed": seed, "keys": chosen}
        return self.out.write_bytes(f"sets/seed-{seed}.json", json.dumps(about, indent=1).encode())


def run_repeat(
    cfg: EvaluateConfig,
    setup: Setup,
    seed: int,
    chooser: Chooser | None,
    store: RepeatStore,
    mlflow_run: MLflowRun | None,
) -> RepeatResult:
    """One repeat: its training set (a choosing baseline's keys written to sets/), the student trained on Ray Train
    (a run named <name>-seed<seed>: a rerun resumes it), and the result (not yet stored)."""
    t0 = time.time()
    train_ds, about, n_train, chosen = train_set(cfg, setup.names, setup.k, setup.r, seed, chooser)
    if n_train == 0:
        raise ValueError(f"the training set ({about.get('source')}) has no images of the teacher's classes")
    if chosen is not None:
        about["keys_file"] = store.write_chosen(cfg, seed, chosen)
    loop = ClassifierLoopConfig.of(
        cfg,
        objective=setup.objective,
        arch=cfg.student,
        num_classes=setup.k,
        resolution=setup.r,
        eval_every=setup.eval_every,
        mean=setup.meta["mean"],
        std=setup.meta["std"],
        seed=seed,
        n_train=n_train,
        n_test=setup.n_test,
        tracking=mlflow_run,
        cutmix_alpha=cfg.cutmix_alpha,
        cutmix_p=cfg.cutmix_p,
        temperature=cfg.temperature,
        teacher_ref=setup.teacher_ref if setup.objective in TEACHER_OBJECTIVES else None,
        metric_prefix=f"seed-{seed}/",
    )
    spec = harness.RunSpec.of(cfg, use_gpu=setup.use_gpu, name=f"{cfg.name}-seed{seed}")
    history, best = classifier_history(fit_classifier(loop, train_ds, setup.test_ds, spec))
    last = history[-1]
    return RepeatResult(
        seed=seed,
        best_top1=best["top1"],
        best_top5=best["top5"],
        best_epoch=int(best["epoch"]),
        final_top1=last["top1"],
        train_images=int(last["train_images"]),
        train_refused=int(last["train_refused"]),
        test_images=int(last["test_images"]),
        train_set=about,
        history=history,
        settings=store.settings,
        wall_s=time.time() - t0,
    )


def summarise(cfg: EvaluateConfig, setup: Setup, repeats: list[RepeatResult]) -> EvaluationResults:
    """The results: the repeats' mean and (population) std of the best top-1 and top-5, in percent."""
    top1 = np.array([x.best_top1 for x in repeats]) * 100
    top5 = np.array([x.best_top5 for x in repeats]) * 100
    ipc: float | None
    if cfg.baseline is None:  # images per class the distilled set holds (files from before "classes": the teacher's)
        ipc = round(repeats[0].train_images / (repeats[0].train_set.get("classes") or setup.k), 2)
    else:
        ipc = cfg.ipc if cfg.baseline in CHOOSERS else None
    return EvaluationResults(
        label=cfg.label or (cfg.distilled if cfg.distilled is not None else cfg.method),
        method=cfg.method,
        labels=cfg.labels,
        student=cfg.student,
        teacher=cfg.teacher,
        teacher_test_top1=setup.meta.get("test_top1"),
        ipc=ipc,
        repeats=len(repeats),
        top1_mean=float(top1.mean()),
        top1_std=float(top1.std()),
        top5_mean=float(top5.mean()),
        top5_std=float(top5.std()),
        per_repeat=tuple(repeats),
        config=json.loads(json.dumps(asdict(cfg))),  # as results.json holds it (tuples as lists)
        command=setup.command,
        device="GPU" if setup.use_gpu else "CPU",
        torch=torch.__version__,
        ray=ray.__version__,
        wall_s=time.time() - setup.t_start,
    )
