"""What `evaluate` writes and reads back, as typed records: one repeat, the results, the dry-run plan.

    RepeatResult        repeats/seed-<s>.json, and each entry of results.json's "per_repeat"
    EvaluationResults   results.json: the repeats, their mean and std, the config and the environment
    EvaluationPlan      what --dry-run prints (`format_plan`)
    table_row           results.md's line, the row of docs/results.md's tables

The files are JSON written by `to_json`, with a "version" key (RESULTS_VERSION). `from_json` is the one reader of
every file ever written: version 1 (no "version" key) is a file from before the records; a key it lacks (one added
since the file was written) gets the value it was computed with (OLD_DEFAULTS) or None (not recorded). Nothing
here imports torch or Ray: `diagnose compare` and `diagnose figure` read results.json through it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, TypedDict

from d3hr_ray.errors import check_version

__all__ = [
    "OLD_DEFAULTS",
    "RESULTS_VERSION",
    "EvaluationPlan",
    "EvaluationResults",
    "RepeatResult",
    "TrainSet",
    "format_plan",
    "table_row",
]

# 1: files without a "version" key (before these records); 2: with it.
RESULTS_VERSION = 2
# What a stored repeat's settings, or a results.json, lacking a key was computed with (the default when the file
# was written, before the key existed).
OLD_DEFAULTS: dict[str, str] = {"labels": "kd"}

# A JSON object (config, settings): str keys, JSON values.
JSONObject = dict[str, Any]
# One evaluation's metrics as the classifier loop reports them: epoch, top1, top5, train_images, train_refused,
# test_images (numbers).
Metrics = dict[str, float]


class TrainSet(TypedDict, total=False):
    """What a repeat trained on ("train_set"): the source, and per kind of set what was counted or chosen."""

    source: str | None  # --distilled or --real
    classes: int  # a distilled set: the classes it holds (absent in files written before it was counted)
    selected: int  # a chosen baseline: the images chosen
    classes_with_fewer: dict[str, int]  # a chosen baseline: class id -> its images, when fewer than --ipc
    keys_file: str  # a chosen baseline: sets/seed-<s>.json, the chosen keys


def _read(data: bytes | str, what: str) -> JSONObject:
    """The JSON object of a file written by `to_json` of any version; newer versions are refused."""
    obj = json.loads(data)
    check_version(obj.pop("version", 1), RESULTS_VERSION, what)
    return obj


def _write(record: Any) -> bytes:
    return json.dumps({"version": RESULTS_VERSION, **asdict(record)}, indent=2).encode()


@dataclass(frozen=True)
class RepeatResult:
    """One repeat: a student trained with one seed, scored on the test set at every evaluation.

    Accuracies are fractions in [0, 1] of the test images scored (the workers' count, `test_images`).
    """

    seed: int  # the repeat's seed (student init, order, augmentation, a random-real subset)
    best_top1: float  # the best test top-1 over the run's evaluations
    best_top5: float  # the top-5 of that evaluation
    best_epoch: int  # its epoch (1-based)
    final_top1: float  # the last evaluation's top-1
    train_images: int  # usable training images (the workers' count)
    train_refused: int | None  # training inputs refused (undecodable); None: a file from before they were counted
    test_images: int  # test images scored
    train_set: TrainSet  # what the repeat trained on
    history: list[Metrics]  # every evaluation's metrics, in epoch order
    settings: JSONObject | None  # the config's RESULT_KEYS it was computed with; None: a file from before them
    wall_s: float  # seconds the repeat took

    @classmethod
    def from_dict(cls, obj: JSONObject) -> RepeatResult:
        """From a repeat as any version stored it (a repeat file's object, or an entry of "per_repeat")."""
        settings = obj.get("settings")
        return cls(
            seed=obj["seed"],
            best_top1=obj["best_top1"],
            best_top5=obj["best_top5"],
            best_epoch=obj["best_epoch"],
            final_top1=obj["final_top1"],
            train_images=obj["train_images"],
            train_refused=obj.get("train_refused"),
            test_images=obj["test_images"],
            train_set=obj["train_set"],
            history=obj["history"],
            settings=None if settings is None else {**OLD_DEFAULTS, **settings},
            wall_s=obj["wall_s"],
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> RepeatResult:
        """A repeats/seed-<s>.json of any version."""
        return cls.from_dict(_read(data, "repeat file"))

    def to_json(self) -> bytes:
        return _write(self)


@dataclass(frozen=True)
class EvaluationResults:
    """results.json: one evaluation (a set, a student, a label regime), every repeat and their summary.

    Means and stds (population, over the repeats) are of the per-repeat best accuracies, in percent.
    """

    label: str  # the row's label (--label, else the distilled set or the baseline)
    method: str  # "distilled", "random real, IPC 10", "herding, IPC 10", "full real data"
    labels: str  # the label regime: kd, soft or hard
    student: str  # the student architecture
    teacher: str | None  # --teacher (None: hard labels without one)
    teacher_test_top1: float | None  # the teacher folder's own test top-1 (fraction), when it records one
    ipc: float | None  # images per class (a distilled set's: its images / its classes); None: full data
    repeats: int  # how many repeats are summarised
    top1_mean: float
    top1_std: float
    top5_mean: float
    top5_std: float
    per_repeat: tuple[RepeatResult, ...]  # in seed order
    config: JSONObject  # the EvaluateConfig, every field
    command: str | None  # the command line, when run from one
    device: str  # "GPU" or "CPU"
    torch: str  # versions
    ray: str
    wall_s: float  # seconds the evaluation took (this run: stored repeats cost nothing)

    @property
    def set_name(self) -> str:
        """The label without its ", IPC n" suffix: the rows of one set at several IPCs share it."""
        return re.sub(r",?\s*IPC\s*[\d.]+$", "", self.label).strip() or self.label

    @property
    def top1(self) -> list[float]:
        """Each repeat's best top-1 in percent."""
        return [100.0 * r.best_top1 for r in self.per_repeat]

    @classmethod
    def from_json(cls, data: bytes | str) -> EvaluationResults:
        """A results.json of any version (one from before --labels: kd)."""
        obj = {**OLD_DEFAULTS, **_read(data, "results.json")}
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(obj))
        if missing:
            raise ValueError(f"not a results.json of evaluate: it lacks {', '.join(missing)}")
        values = {k: v for k, v in obj.items() if k in known}
        values["per_repeat"] = tuple(RepeatResult.from_dict(r) for r in obj["per_repeat"])
        return cls(**values)

    def to_json(self) -> bytes:
        return _write(self)


@dataclass(frozen=True)
class EvaluationPlan:
    """What `evaluate --dry-run` reads from the listings and the teacher's metadata (nothing trained or loaded)."""

    teacher: str | None  # --teacher
    teacher_arch: str | None  # its architecture (the folder's, or --teacher-arch)
    teacher_weights: str | None  # a torchvision teacher's checkpoint file, and whether it is present
    classes: int  # the teacher's (or the test set's) classes
    resolution: int | None  # image side the student trains at
    train: str  # the training set's location and method
    train_images: int  # images it would train on (at most --ipc per class for a chosen baseline)
    train_classes: int  # classes of `classes` it has images of
    test_images: int
    student: str
    labels: str
    lr: float
    epochs: int
    batch_size: int
    steps_per_epoch: int
    steps: int  # a repeat's optimizer steps
    repeats: int


def format_plan(p: EvaluationPlan) -> str:
    """The dry run's lines."""
    teacher = "none (hard labels)" if p.teacher is None else f"{p.teacher} ({p.teacher_arch})"
    lines = [
        "plan (--dry-run: nothing trained, nothing written)",
        f"train     {p.train}: {p.train_images:,} images in {p.train_classes:,} of {p.classes:,} classes",
        f"test      {p.test_images:,} images",
        f"student   {p.student} at {p.resolution} px, {p.labels} labels, AdamW lr {p.lr:g}",
        f"teacher   {teacher}",
    ]
    if p.teacher_weights:
        lines.append(f"          weights {p.teacher_weights}")
    lines.append(
        f"steps     {p.epochs:,} epochs x {p.steps_per_epoch:,} batches of {p.batch_size:,} = "
        f"{p.steps:,} steps a repeat, {p.repeats} repeat(s)"
    )
    return "\n".join(lines)


def table_row(results: EvaluationResults) -> str:
    """| label | student | labels | IPC | top-1 mean +- std | top-5 | repeats | `command` |"""
    r = results
    ipc = "all" if r.ipc is None else f"{r.ipc:g}"
    cmd = f"`{r.command}`" if r.command else ""
    return (
        f"| {r.label} | {r.student} | {r.labels} | {ipc} | {r.top1_mean:.1f} ± {r.top1_std:.1f} | "
        f"{r.top5_mean:.1f} ± {r.top5_std:.1f} | {r.repeats} | {cmd} |"
    )
