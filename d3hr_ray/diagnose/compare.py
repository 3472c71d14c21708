"""Evaluate results side by side: a Markdown table of rows, each with Welch's t-test against a reference row.

Reads results.json files (`evaluate`'s) and prints, per row: its label, label regime, IPC, the mean and
std of the best top-1 over repeats, the repeats, the difference to the reference row of the same regime
and IPC, and Welch's two-sided p-value (scipy, unequal variances) on the per-repeat best top-1. The
reference is the row whose label contains `--reference` (default "random real"). A row with a single
repeat, or a reference with one, gets no p-value.

    python -m d3hr_ray.diagnose compare --results 'out/eval/*/results.json' --reference "random real"
"""

from __future__ import annotations

import argparse
import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from d3hr_ray.evaluation.records import EvaluationResults

__all__ = ["Compared", "compare_rows", "load_rows", "markdown"]


@dataclass(frozen=True)
class Compared:
    """One row of the table: a results.json and its numbers against the reference of its regime and IPC."""

    row: EvaluationResults
    mean: float  # of the per-repeat best top-1 (%)
    std: float  # population std of the same
    n: int  # repeats
    diff: float | None  # mean - the reference's mean; None for the reference itself, or without one
    p: float | None  # Welch's two-sided p-value; None without a reference or with a single repeat on either side


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", action="append", required=True, help="results.json files or glob patterns (repeat the flag)"
    )
    p.add_argument("--reference", default="random real", help="the reference row: the first whose label contains this")
    p.add_argument(
        "--details",
        action="store_true",
        help="add each row's per-repeat values and the command that produced it (results.json's 'command')",
    )


def load_rows(paths: list[str]) -> list[EvaluationResults]:
    """The results.json files, of any version (`EvaluationResults.from_json`)."""
    return [EvaluationResults.from_json(Path(path).read_bytes()) for path in paths]


def compare_rows(rows: list[EvaluationResults], reference: str) -> list[Compared]:
    """Each row against the reference of its regime and IPC, sorted by regime, IPC (full data last) and label."""
    refs = {(r.labels, r.ipc): r for r in rows if reference in r.label}
    out = []
    for r in sorted(rows, key=lambda r: (r.labels, r.ipc if r.ipc is not None else 1e9, r.label)):
        ref = refs.get((r.labels, r.ipc))
        diff = p = None
        if ref is not None and ref is not r:
            diff = float(np.mean(r.top1) - np.mean(ref.top1))
            if len(r.top1) > 1 and len(ref.top1) > 1:
                p = float(stats.ttest_ind(r.top1, ref.top1, equal_var=False).pvalue)
        out.append(Compared(r, float(np.mean(r.top1)), float(np.std(r.top1)), len(r.top1), diff, p))
    return out


def markdown(compared: list[Compared], reference: str, details: bool = False) -> str:
    """The table; `details` adds the per-repeat values and the command columns."""
    head = f"| set | labels | IPC | top-1 (%) | repeats | vs {reference} | Welch p |"
    lines = [
        head + (" per repeat | command |" if details else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if details else ""),
    ]
    for c in compared:
        r = c.row
        ipc = "all" if r.ipc is None else f"{r.ipc:g}"
        diff = "" if c.diff is None else f"{c.diff:+.1f}"
        p = "" if c.p is None else (f"{c.p:.3f}" if c.p >= 0.001 else "< 0.001")
        line = f"| {r.set_name} | {r.labels} | {ipc} | {c.mean:.1f} ± {c.std:.1f} | {c.n} | {diff} | {p} |"
        if details:
            command = f"`{r.command}`" if r.command else "(not recorded)"
            line += f" {', '.join(f'{t:.1f}' for t in r.top1)} | {command.replace('|', chr(92) + '|')} |"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    paths = sorted({p for pattern in args.results for p in (glob.glob(pattern) or [pattern])})
    rows = load_rows(paths)
    if not rows:
        raise SystemExit("--results: no results.json found")
    print(markdown(compare_rows(rows, args.reference), args.reference, details=args.details))
    return 0
