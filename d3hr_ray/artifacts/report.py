"""What a distill run reports: its stage timings, its progress lines, the run's report (status, reasons, counts,
skips, what was resumed), as typed records that the stages return, and the `Manifest` built from them (manifest.json).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict

from d3hr_ray.config import DistillConfig
from d3hr_ray.errors import check_version

__all__ = [
    "PROGRESS_EVERY_S",
    "ClassCounts",
    "MANIFEST_VERSION",
    "Manifest",
    "Progress",
    "Resume",
    "Resumed",
    "RunReport",
    "Skip",
    "StageTime",
    "Timings",
    "Work",
]

# Seconds between progress lines in the job's log.
PROGRESS_EVERY_S = 30.0


class StageTime(TypedDict):
    """A stage of the manifest's "stages"."""

    items: int
    seconds: float
    items_per_s: float | None


class Work(TypedDict):
    """A stage's resumed work in the manifest's "resume": of `total` units, `reused` from an earlier run."""

    total: int
    reused: int
    computed: int


class Resume(TypedDict, total=False):
    """The manifest's "resume": whether the run continued an earlier one, and its shards' and classes' work."""

    resumed: bool
    shards: Work
    classes: Work


class ClassCounts(TypedDict):
    """A class's inputs in the manifest's "counts": read, used by its statistics, skipped."""

    read: int
    used: int
    skipped: int


# An input the run refused ("class" is a keyword, hence the functional form).
Skip = TypedDict("Skip", {"input": str, "class": str | None, "reason": str})


@dataclass
class Timings:
    """Stage name -> (items, seconds), in the order the stages ran (a stage timed twice adds up)."""

    stages: dict[str, tuple[int, float]] = field(default_factory=dict)

    def add(self, stage: str, items: int, seconds: float) -> None:
        n, s = self.stages.get(stage, (0, 0.0))
        self.stages[stage] = (n + int(items), s + float(seconds))

    def merge(self, other: Timings) -> None:
        for stage, (n, s) in other.stages.items():
            self.add(stage, n, s)

    def table(self) -> str:
        """The stage table a run prints: items, seconds, items/s."""
        lines = [f"{'stage':<28}{'items':>10}{'seconds':>10}{'items/s':>12}"]
        for stage, (n, s) in self.stages.items():
            lines.append(f"{stage:<28}{n:>10}{s:>10.2f}{(n / s if s > 0 else float('nan')):>12.1f}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, StageTime]:
        """The manifest's "stages": {stage: {items, seconds, items_per_s}}."""
        return {
            k.strip(): {"items": n, "seconds": round(s, 3), "items_per_s": round(n / s, 2) if s > 0 else None}
            for k, (n, s) in self.stages.items()
        }


@dataclass(frozen=True)
class Resumed:
    """How much of a stage's work an earlier run had finished: of `total` units, `reused` were, `computed` now."""

    total: int
    reused: int

    @property
    def computed(self) -> int:
        return self.total - self.reused

    def as_dict(self) -> Work:
        return {"total": self.total, "reused": self.reused, "computed": self.computed}


@dataclass
class RunReport:
    """The run as the manifest and the command line report it; filled in by the job as its stages return."""

    resumed: bool = False
    status: str = "running"  # complete, incomplete (classes that cannot be distilled), failed
    reasons: list[str] = field(default_factory=list)
    undistilled: dict[str, str] = field(default_factory=dict)  # class name -> why
    counts: dict[str, ClassCounts] = field(default_factory=dict)  # class name -> {read, used, skipped}
    skipped: list[Skip] = field(default_factory=list)  # {input, class, reason}
    scores: dict[str, float] = field(default_factory=dict)  # class name -> the chosen group's score
    selected_keys: dict[str, list[str] | None] = field(
        default_factory=dict
    )  # --candidates-from real: class -> input keys
    shards: Resumed | None = None
    classes: Resumed | None = None
    timings: Timings = field(default_factory=Timings)

    def resume_dict(self) -> Resume:
        out: Resume = {"resumed": self.resumed}
        if self.shards is not None:
            out["shards"] = self.shards.as_dict()
        if self.classes is not None:
            out["classes"] = self.classes.as_dict()
        return out

    def fail(self, error: BaseException) -> None:
        self.status = "failed"
        self.reasons.append(str(error).splitlines()[0][:500] if str(error) else type(error).__name__)


class Progress:
    """A log line every PROGRESS_EVERY_S seconds (and at the end): done/total, images/s, time left."""

    def __init__(self, what: str, unit: str, total: int, already: int):
        self.what, self.unit, self.total, self.already = what, unit, total, already
        self.new = self.images = 0
        self.t0 = self.last = time.perf_counter()
        print(f"{what}: {total} {unit}, {already} already done, {total - already} to compute", flush=True)

    def step(self, images: int) -> None:
        self.new += 1
        self.images += images
        now = time.perf_counter()
        done = self.already + self.new
        if now - self.last >= PROGRESS_EVERY_S or done == self.total:
            self.last = now
            took = max(now - self.t0, 1e-9)
            left_min = took / self.new * (self.total - done) / 60
            print(
                f"{self.what}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%), "
                f"{self.images / took:.1f} images/s, about {left_min:.1f} min left",
                flush=True,
            )


# manifest.json's version (as run.json's and results.json's): 1, files without a "version" key (before the
# Manifest record); 2, with it. Not to be confused with "versions", the packages' versions.
MANIFEST_VERSION = 2


@dataclass(frozen=True)
class Manifest:
    """manifest.json (docs/operations.md, "manifest.json"): a run's outcome, settings, counts, timings and versions.

    `to_json` writes the keys in this order (stats_subset and selected_keys only when set), then "version"
    (MANIFEST_VERSION); `from_json` reads any manifest written since the format began: keys a manifest lacks take
    their empty value, a skipped input written as [input, class, reason] (early versions) becomes a `Skip`, and a
    version newer than this code's is refused.
    """

    status: str  # complete, incomplete, failed
    reasons: list[str]
    undistilled: dict[str, str]  # class name -> why it was not distilled
    config: dict[str, Any]  # DistillConfig.to_dict(): the flags' JSON values
    resolved: dict[str, Any]  # devices, actors and sizes the run used (JSON values)
    class_names: list[str]  # of the classes distilled, in id order
    class_ids: list[int]
    counts: dict[str, ClassCounts]
    skipped: list[Skip]
    scores: dict[str, float]
    resume: Resume
    stages: dict[str, StageTime]
    versions: dict[str, str]
    statistics_from: str | None
    stats_subset: dict[str, int | None] | None = None  # --stats-per-class: {per_class, inputs}
    selected_keys: dict[str, list[str] | None] | None = None  # --candidates-from real: the input each image is

    @classmethod
    def build(
        cls,
        cfg: DistillConfig,
        report: RunReport,
        resolved: dict[str, Any],
        names: dict[int, str],
        stats_subset: dict[str, int | None] | None,
        versions: dict[str, str],
    ) -> Manifest:
        """The manifest of a run: its config, its `RunReport`, what it resolved, the classes it distils."""
        return cls(
            status=report.status,
            reasons=report.reasons,
            undistilled=report.undistilled,
            config=cfg.to_dict(),
            resolved=resolved,
            class_names=[names[c] for c in sorted(names)],
            class_ids=sorted(names),
            counts=report.counts,
            skipped=report.skipped,
            scores=report.scores,
            resume=report.resume_dict(),
            stages=report.timings.as_dict(),
            versions=versions,
            statistics_from=cfg.from_stats,
            stats_subset=stats_subset,
            selected_keys=report.selected_keys or None,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of manifest.json."""
        out: dict[str, Any] = {
            "status": self.status,
            "reasons": self.reasons,
            "undistilled": self.undistilled,
            "config": self.config,
            "resolved": self.resolved,
            "class_names": self.class_names,
            "class_ids": self.class_ids,
            "counts": self.counts,
            "skipped": self.skipped,
            "scores": self.scores,
            "resume": self.resume,
            "stages": self.stages,
            "versions": self.versions,
            "statistics_from": self.statistics_from,
        }
        if self.stats_subset is not None:
            out["stats_subset"] = self.stats_subset
        if self.selected_keys:
            out["selected_keys"] = self.selected_keys
        out["version"] = MANIFEST_VERSION
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """A manifest.json object, of this version or an earlier one (ValueError for a newer one)."""
        check_version(data.get("version", 1), MANIFEST_VERSION, "manifest.json")
        skipped = [_skip(s) for s in data.get("skipped") or []]
        resume: Resume = data.get("resume") or Resume()
        return cls(
            status=str(data.get("status", "unknown")),
            reasons=list(data.get("reasons") or []),
            undistilled=dict(data.get("undistilled") or {}),
            config=dict(data.get("config") or {}),
            resolved=dict(data.get("resolved") or {}),
            class_names=list(data.get("class_names") or []),
            class_ids=list(data.get("class_ids") or []),
            counts=dict(data.get("counts") or {}),
            skipped=skipped,
            scores=dict(data.get("scores") or {}),
            resume=resume,
            stages=dict(data.get("stages") or {}),
            versions=dict(data.get("versions") or {}),
            statistics_from=data.get("statistics_from"),
            stats_subset=data.get("stats_subset"),
            selected_keys=data.get("selected_keys"),
        )

    @property
    def ipc(self) -> int:
        """Images a distilled class has on disk: --ipc, 0 for --stats-only."""
        return 0 if self.config.get("stats_only") else int(self.config.get("ipc") or 0)

    def metrics(self) -> dict[str, float]:
        """What MLflow records of the run: each stage's seconds and items/s ("select (actor s)" ->
        select_actor_s/seconds), the images read, used and skipped (summed over the classes), the undistilled classes.
        """
        out: dict[str, float] = {}
        for stage, t in self.stages.items():
            name = re.sub(r"[^A-Za-z0-9]+", "_", stage).strip("_")
            seconds, rate = t["seconds"], t["items_per_s"]
            out[f"{name}/seconds"] = seconds
            if rate is not None:  # log_metrics skips non-numbers: None was never logged
                out[f"{name}/items_per_s"] = rate
        out["images_read"] = sum(c["read"] for c in self.counts.values())
        out["images_used"] = sum(c["used"] for c in self.counts.values())
        out["images_skipped"] = sum(c["skipped"] for c in self.counts.values())
        out["classes_undistilled"] = len(self.undistilled)
        return out


def _skip(s: dict[str, Any] | list[Any]) -> Skip:
    """A skipped input as manifest.json holds it: {input, class, reason}, or [input, class id, reason] (early files)."""
    if isinstance(s, dict):
        return {"input": s.get("input", ""), "class": s.get("class"), "reason": s.get("reason", "")}
    return {"input": s[0], "class": None, "reason": s[-1]}
