"""What a distill run reports: its stage timings, its progress lines, and the run's report (status, reasons,
counts, skips, what was resumed), as typed records that the stages return and the manifest is built from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["PROGRESS_EVERY_S", "Progress", "Resumed", "RunReport", "Timings"]

# Seconds between progress lines in the job's log.
PROGRESS_EVERY_S = 30.0


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

    def as_dict(self) -> dict:
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

    def as_dict(self) -> dict:
        return {"total": self.total, "reused": self.reused, "computed": self.computed}


@dataclass
class RunReport:
    """The run as the manifest and the command line report it; filled in by the job as its stages return."""

    resumed: bool = False
    status: str = "running"  # complete, incomplete (classes that cannot be distilled), failed
    reasons: list[str] = field(default_factory=list)
    undistilled: dict[str, str] = field(default_factory=dict)  # class name -> why
    counts: dict[str, dict] = field(default_factory=dict)  # class name -> {read, used, skipped}
    skipped: list[dict] = field(default_factory=list)  # {input, class, reason}
    scores: dict[str, float] = field(default_factory=dict)  # class name -> the chosen group's score
    selected_keys: dict[str, list[str]] = field(default_factory=dict)  # --candidates-from real: class -> input keys
    shards: Resumed | None = None
    classes: Resumed | None = None
    timings: Timings = field(default_factory=Timings)

    def resume_dict(self) -> dict:
        out: dict = {"resumed": self.resumed}
        for name in ("shards", "classes"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).as_dict()
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
