"""report.html: a browsable page of a distilled set, written into the output with manifest.json.

    rows_from_state(...)  one `ClassRow` per class, from the per-class state files that exist (so a resumed run, a
                          failed one and a complete one all describe what is on disk) and the manifest's counts
    render(...)           the page: status, reasons, a row per class (name, inputs used, score, its images as lazy
                          thumbnails), the stage timings, what was resumed, the settings, links to the files
    write_report(...)     both, into `<output>/report.html`

The page is one file with its style inline: no script, no font, no request to anywhere. Every link is relative
(the images under images/, distilled.parquet, the statistics and latents), so it reads the same from a local
folder, a copied folder or a static S3 website. Class names are HTML-escaped as text and percent-encoded in links
(a class folder may hold '%', '#', '?' or spaces: `outputs.class_folder`). Pure Python, no torch.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from dataclasses import dataclass
from urllib.parse import quote

from d3hr_ray.pipeline.outputs import image_path

__all__ = ["REPORT_FILE", "ClassRow", "render", "rows_from_state", "write_report"]

REPORT_FILE = "report.html"
# The files a reader may want, in the order the page links them (those that exist).
LINKED_FILES = ("distilled.parquet", "stats.safetensors", "latents.safetensors", "manifest.json", "grid.png")
# Thumbnails are drawn at the image's size, enlarged to at least THUMB_MIN_PX and shrunk to at most THUMB_MAX_PX CSS
# pixels a side (pixelated when enlarged: a 16 px image stays legible).
THUMB_MIN_PX, THUMB_MAX_PX = 48, 96
# Skipped inputs the page names one by one (all are counted, and manifest.json lists every one).
SKIPS_SHOWN = 50


@dataclass(frozen=True)
class ClassRow:
    """One class of the page.

    name: the class name as the data and the model give it (any text);
    used: inputs its statistics used (None: unknown, e.g. statistics from a file without counts);
    images: distilled images of it on disk (0: not distilled, or --stats-only);
    score: the chosen group's score (None: none, NaN for noise latents);
    note: why it was not distilled, when it was not.
    """

    name: str
    used: int | None
    images: int
    score: float | None = None
    note: str = ""


def _href(rel: str) -> str:
    """A relative file path as a link: every segment percent-encoded, so the browser asks for that exact name."""
    return "/".join(quote(part, safe="") for part in rel.split("/"))


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def rows_from_state(
    manifest: dict, names: dict[int, str], finished: set[int], ipc: int, stats_count=None
) -> list[ClassRow]:
    """A row per class being distilled (id order), then one per undistilled class.

    Args:
        manifest: the run's manifest (counts, scores, undistilled).
        names: class id -> name of the classes being distilled.
        finished: ids whose per-class state file exists (their `ipc` images are written).
        ipc: images per class; 0 for --stats-only.
        stats_count: (num_classes,) inputs per class of a --from-stats file, used where the manifest has no counts.
    """
    counts, scores = manifest.get("counts") or {}, manifest.get("scores") or {}

    def used(c: int | None, name: str) -> int | None:
        if name in counts:
            return int(counts[name].get("used", 0))
        if stats_count is not None and c is not None and c < len(stats_count):
            return int(stats_count[c])
        return None

    rows = [
        ClassRow(name, used(c, name), ipc if c in finished else 0, scores.get(name))
        for c, name in sorted(names.items())
    ]
    by_name = {n: c for c, n in names.items()}
    for name, why in (manifest.get("undistilled") or {}).items():
        if name not in by_name:
            rows.append(ClassRow(name, used(None, name), 0, None, str(why)))
    return rows


def _table(headers: list[str], body: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _score(s) -> str:
    if s is None:
        return ""
    s = float(s)
    return "n/a" if math.isnan(s) else f"{s:.3f}"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;
text-align:left}th{background:#f3f3f3}
.status-complete{color:#176317}.status-incomplete{color:#a15c00}.status-failed{color:#b00020}
.thumbs img{image-rendering:pixelated;margin:1px;border:1px solid #ddd;background:#eee}
code{background:#f5f5f5;padding:0 .2em}
"""


def render(manifest: dict, rows: list[ClassRow], links: list[str], output_size: int | None) -> str:
    """The page (a complete HTML document).

    Args:
        manifest: the run's manifest.json content.
        rows: the classes (rows_from_state).
        links: files of the output to link (relative paths that exist).
        output_size: the side of the distilled images in pixels (thumbnails: at most THUMB_MAX_PX).
    """
    status = str(manifest.get("status", "unknown"))
    cfg = manifest.get("config") or {}
    px = max(THUMB_MIN_PX, min(int(output_size or THUMB_MAX_PX), THUMB_MAX_PX))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>D3HR distilled set: {_e(cfg.get('output', ''))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>D3HR distilled set</h1>",
        f'<p>Status: <strong class="status-{_e(status)}">{_e(status)}</strong>. '
        f"{sum(r.images for r in rows)} images of {sum(1 for r in rows if r.images)} classes "
        f"({_e(cfg.get('ipc', ''))} a class) from <code>{_e(cfg.get('data') or cfg.get('from_stats') or '')}</code> "
        f"with <code>{_e(cfg.get('model', ''))}</code>.</p>",
    ]
    if manifest.get("statistics_from"):
        parts.append(f"<p>Statistics from <code>{_e(manifest['statistics_from'])}</code>.</p>")
    if manifest.get("reasons"):
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in manifest["reasons"]) + "</ul>")
    if links:
        parts.append("<p>Files: " + " · ".join(f'<a href="{_e(_href(rel))}">{_e(rel)}</a>' for rel in links) + "</p>")

    parts.append(f'<h2 id="classes">Classes ({len(rows)})</h2>')
    body = []
    for r in rows:
        thumbs = "".join(
            f'<a href="{_e(_href(image_path(r.name, k)))}"><img loading="lazy" width="{px}" height="{px}" '
            f'src="{_e(_href(image_path(r.name, k)))}" alt="{_e(f"{r.name} {k}")}"></a>'
            for k in range(r.images)
        )
        body.append(
            [
                _e(r.name),
                "" if r.used is None else str(r.used),
                _score(r.score),
                f'<div class="thumbs">{thumbs}</div>'
                if r.images
                else _e(r.note or ("statistics only" if cfg.get("stats_only") else "not distilled")),
            ]
        )
    parts.append(_table(["class", "inputs used", "score", "images"], body, "classes"))

    stages = manifest.get("stages") or {}
    if stages:
        parts.append("<h2>Timings</h2>")
        parts.append(
            _table(
                ["stage", "items", "seconds", "items/s"],
                [
                    [_e(k), _e(v.get("items", "")), _e(v.get("seconds", "")), _e(v.get("items_per_s", ""))]
                    for k, v in stages.items()
                ],
            )
        )
    resume = manifest.get("resume") or {}
    if resume:
        parts.append("<h2>Resume</h2>")
        resumed = "yes: this run continued an earlier one" if resume.get("resumed") else "no: a fresh run"
        body = [
            [_e(kind), *(_e(v.get(x, "")) for x in ("total", "reused", "computed"))]
            for kind, v in resume.items()
            if isinstance(v, dict)
        ]
        parts.append(f"<p>Resumed: {resumed}.</p>" + _table(["work", "total", "reused", "computed"], body))
    skipped = manifest.get("skipped") or []
    parts.append(f"<h2>Skipped inputs ({len(skipped)})</h2>")
    if skipped:
        reasons = Counter(str(s["reason"] if isinstance(s, dict) else s[-1]) for s in skipped)
        parts.append(_table(["reason", "inputs"], [[_e(k), str(n)] for k, n in reasons.most_common()]))
        shown = [s if isinstance(s, dict) else {"input": s[0], "reason": s[-1]} for s in skipped[:SKIPS_SHOWN]]
        parts.append(_table(["input", "reason"], [[_e(s.get("input", "")), _e(s.get("reason", ""))] for s in shown]))
        if len(skipped) > SKIPS_SHOWN:
            parts.append(f"<p>… and {len(skipped) - SKIPS_SHOWN} more: manifest.json lists every one.</p>")
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["setting", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in cfg.items()]))
    resolved = manifest.get("resolved") or {}
    if resolved:
        parts.append("<h2>Resolved</h2>")
        parts.append(_table(["what", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in resolved.items()]))
    versions = manifest.get("versions") or {}
    if versions:
        parts.append("<p>Versions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items()) + ".</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out, manifest: dict, names: dict[int, str], state, output_size: int | None, stats_count=None) -> str:
    """report.html into `out` (an io.fs.OutputDir) from the manifest and the per-class state; its location."""
    cfg = manifest.get("config") or {}
    ipc = 0 if cfg.get("stats_only") else int(cfg.get("ipc") or 0)
    rows = rows_from_state(manifest, names, state.finished_classes() if ipc else set(), ipc, stats_count)
    links = [rel for rel in LINKED_FILES if out.exists(rel)]
    return out.write_bytes(REPORT_FILE, render(manifest, rows, links, output_size).encode("utf-8"))
