"""Top-1 against IPC from `evaluate` results: a line per set, a panel per label regime, error bars one std.

Reads results.json files (their label, labels regime, IPC, mean and std of the best top-1 over repeats);
a row's set is its label without the ", IPC n" suffix, so the IPC 1 and IPC 10 rows of one set join into
a line. Rows without an IPC (full data) are drawn as a dashed level across their panel.

    python -m d3hr_ray.diagnose figure --results 'out/eval/*/results.json' --output docs/images/ipc.png
"""

from __future__ import annotations

import argparse
import glob
import io
from pathlib import Path
from typing import TYPE_CHECKING

from d3hr_ray.evaluation.records import EvaluationResults

if TYPE_CHECKING:
    from matplotlib.artist import Artist

__all__ = ["LABEL_REGIMES", "collect", "draw", "learning_curves"]

# Panels, left to right, and their titles.
LABEL_REGIMES = {"kd": "soft labels + KD (the paper's)", "soft": "fixed soft labels", "hard": "hard labels"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", action="append", required=True, help="results.json files or glob patterns (repeat the flag)"
    )
    p.add_argument("--output", required=True, help="the figure (.png, .svg or .pdf)")
    p.add_argument("--title", default=None)


def collect(paths: list[str]) -> dict[str, dict[str, list[tuple[float, float, float, int]]]]:
    """{regime: {set: [(IPC, top-1 mean, top-1 std, repeats), ...] sorted by IPC}}; IPC -1 for full data."""
    out: dict[str, dict[str, list[tuple[float, float, float, int]]]] = {}
    for path in paths:
        res = EvaluationResults.from_json(Path(path).read_bytes())  # any version (one from before --labels: kd)
        ipc = -1.0 if res.ipc is None else float(res.ipc)
        out.setdefault(res.labels, {}).setdefault(res.set_name, []).append(
            (ipc, res.top1_mean, res.top1_std, res.repeats)
        )
    for sets in out.values():
        for rows in sets.values():
            rows.sort()
    return out


def draw(
    data: dict[str, dict[str, list[tuple[float, float, float, int]]]], output: str, title: str | None = None
) -> None:
    """Write the figure: one panel per regime present (in LABEL_REGIMES order), shared y axis."""
    import matplotlib  # optional: the 'plot' extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in LABEL_REGIMES if r in data] + sorted(set(data) - set(LABEL_REGIMES))
    n_sets = len({n for sets in data.values() for n in sets})
    height = 4.2 + 0.2 * -(-n_sets // 4)  # room for the legend's rows
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.6 * len(regimes), height), sharey=True, squeeze=False)
    names = sorted({n for sets in data.values() for n in sets})
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {n: palette(i % palette.N) for i, n in enumerate(names)}  # one colour and marker a set, in every panel
    markers = {n: "osD^vPX*<>"[i % 10] for i, n in enumerate(names)}
    for ax, regime in zip(axes[0], regimes, strict=True):
        for name, rows in sorted(data[regime].items()):
            pts = [r for r in rows if r[0] > 0]
            for _, mean, _, _ in (r for r in rows if r[0] <= 0):
                ax.axhline(mean, color=colours[name], linestyle="--", linewidth=1, label=f"{name} ({mean:.1f})")
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    marker=markers[name],
                    capsize=3,
                    color=colours[name],
                    label=name,
                )
        ax.set_xscale("log")
        ticks = sorted({p[0] for rows in data[regime].values() for p in rows if p[0] > 0})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("images per class (IPC)")
        ax.set_title(LABEL_REGIMES.get(regime, regime))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%), mean ± std over repeats")
    legend: dict[str, Artist] = {}  # one legend under the panels: a set's entry once, whichever panels it is in
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    ncol = min(4, max(1, len(legend)))
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    legend_rows = -(-len(legend) // ncol)
    fig.tight_layout(rect=(0, min(0.45, 0.05 + 0.045 * legend_rows), 1, 1))
    fig.savefig(output, dpi=110)
    plt.close(fig)


def learning_curves(runs: list[tuple[str, list[dict[str, float]]]], title: str, key: str = "top1") -> bytes | None:
    """A PNG of `key` (test top-1 by default, in %) against epoch, a line per run (name, its metric history);
    None when matplotlib (the 'plot' extra) is not installed or no run has the metric."""
    try:
        import matplotlib  # optional: the 'plot' extra
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [(name, [(h["epoch"], 100 * h[key]) for h in history if key in h]) for name, history in runs]
    if not any(points for _, points in lines):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in lines:
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test {key} (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    paths = sorted({p for pattern in args.results for p in (glob.glob(pattern) or [pattern])})
    data = collect(paths)
    if not data:
        raise SystemExit("--results: no results.json found")
    draw(data, args.output, args.title)
    print(f"{args.output}: {sum(len(v) for s in data.values() for v in s.values())} rows from {len(paths)} files")
    return 0
