"""report.html: a browsable report of a distilled set, written into the output with manifest.json.

    rows_from_state(...)  one `ClassRow` per class, from the per-class state files that exist (so a resumed run, a
                          failed one and a complete one all describe what is on disk) and the manifest's counts
    thumb_strip(...)      one class's images as one small picture: a grid of at most THUMB_COLS columns, each image
                          at most THUMB_PX pixels a side (WebP)
    render(...)           the pages: report.html opens with the summary (status, reasons, files, stage timings,
                          what was resumed, skipped inputs, settings), then an index of every class and the first
                          CLASSES_PER_PAGE classes; report/page-<k>.html hold the next ones. A class row: name,
                          inputs used, score, its thumbnail strip linking to its first image
    write_report(...)     the thumbnails a class lacks (written once: report/thumbs/<class folder>.webp, from its
                          state file), then the pages, into the output

Why strips and pages: at 1,000 classes x 50 images, one page with an <img> a distilled image was 6.6 MB of HTML and
50,000 full-size requests; here the first page is a few hundred KB (the index is one link a class), a page shows
at most 100 pictures, and the output gains one small file a class (1,000 objects on S3, not 50,000).

Pages are plain HTML with the style inline: no script, no font, no request to anywhere. Every link is relative
(to the images, the thumbnails, the other pages, distilled.parquet, ...), so the report reads the same from a local
folder, a copied folder or a static S3 website. Class names are HTML-escaped as text and percent-encoded in links
(a class folder may hold '%', '#', '?' or spaces: `outputs.class_folder`); anchors are the row numbers (#c0, #c1,
...), never names. Pure Python and PIL, no torch.
"""

from __future__ import annotations

import html
import io
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from PIL import Image

from d3hr_ray.artifacts.outputs import class_folder, image_path
from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.storage.fs import OutputDir

if TYPE_CHECKING:  # a type only: the report is pure Python and PIL
    import numpy as np

__all__ = [
    "CLASSES_PER_PAGE",
    "REPORT_FILE",
    "ClassRow",
    "page_path",
    "render",
    "rows_from_state",
    "thumb_path",
    "thumb_strip",
    "write_report",
]

REPORT_FILE = "report.html"
REPORT_DIR = "report"  # the pages after the first, and the thumbnails
THUMBS_DIR = f"{REPORT_DIR}/thumbs"
# Classes a page shows: the first page's index links every class, so no page holds more than this many strips.
CLASSES_PER_PAGE = 100
# A thumbnail strip: up to THUMB_COLS images a row, each stored at most THUMB_PX pixels a side (smaller images
# keep their size), shown at least THUMB_MIN_PX CSS pixels a side (pixelated when enlarged: 8 px digits stay legible).
THUMB_PX, THUMB_COLS, THUMB_MIN_PX = 64, 10, 48
# Strips of images below this side are stored lossless (a lossy 8 px image smears); larger ones at WEBP_QUALITY.
LOSSLESS_BELOW_PX, WEBP_QUALITY = 32, 80
# The files a reader may want, in the order the summary links them (those that exist).
LINKED_FILES = (
    "distilled.parquet",
    "README.md",
    "stats.safetensors",
    "latents.safetensors",
    "manifest.json",
    "grid.png",
)
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


def page_path(page: int) -> str:
    """The file of page `page` (0-based): report.html, then report/page-2.html, report/page-3.html, ..."""
    return REPORT_FILE if page == 0 else f"{REPORT_DIR}/page-{page + 1}.html"


def thumb_path(name: str) -> str:
    """report/thumbs/<class folder>.webp: the thumbnail strip of a class."""
    return f"{THUMBS_DIR}/{class_folder(name)}.webp"


def _href(rel: str, page: int = 0) -> str:
    """A path relative to the output as a link from page `page`: every segment percent-encoded, so the browser
    asks for that exact name; from report/ the path climbs one folder."""
    return ("../" if page else "") + "/".join(quote(part, safe="") for part in rel.split("/"))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def rows_from_state(
    manifest: Manifest,
    names: dict[int, str],
    finished: set[int],
    ipc: int,
    stats_count: Sequence[int] | np.ndarray | None = None,
) -> list[ClassRow]:
    """A row per class being distilled (id order), then one per undistilled class.

    Args:
        manifest: the run's manifest (counts, scores, undistilled).
        names: class id -> name of the classes being distilled.
        finished: ids whose per-class state file exists (their `ipc` images are written).
        ipc: images per class; 0 for --stats-only.
        stats_count: (num_classes,) inputs per class of a --from-stats file, used where the manifest has no counts.
    """
    counts, scores = manifest.counts, manifest.scores

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
    for name, why in manifest.undistilled.items():
        if name not in by_name:
            rows.append(ClassRow(name, used(None, name), 0, None, str(why)))
    return rows


def _table(headers: list[str], body: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _score(s: float | None) -> str:
    if s is None:
        return ""
    s = float(s)
    return "n/a" if math.isnan(s) else f"{s:.3f}"


def _grid(n: int) -> tuple[int, int]:
    """(columns, rows) of a strip of n images."""
    cols = max(1, min(THUMB_COLS, n))
    return cols, -(-n // cols)


def thumb_strip(pngs: list[bytes], side: int) -> bytes:
    """One class's images as a WebP grid: (rows * side, cols * side) pixels, image k at row k // cols, column
    k % cols (`_grid`), each resized to side x side (LANCZOS when it shrinks)."""
    cols, rows = _grid(len(pngs))
    canvas = Image.new("RGB", (cols * side, rows * side), "white")
    for k, png in enumerate(pngs):
        im = Image.open(io.BytesIO(png)).convert("RGB")
        if im.size != (side, side):
            im = im.resize((side, side), Image.Resampling.LANCZOS)
        canvas.paste(im, ((k % cols) * side, (k // cols) * side))
    buf = io.BytesIO()
    if side < LOSSLESS_BELOW_PX:
        canvas.save(buf, format="WEBP", lossless=True)
    else:
        canvas.save(buf, format="WEBP", quality=WEBP_QUALITY, method=4)
    return buf.getvalue()


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;
text-align:left}th{background:#f3f3f3}
.status-complete{color:#176317}.status-incomplete{color:#a15c00}.status-failed{color:#b00020}
.thumbs img{image-rendering:pixelated;border:1px solid #ddd;background:#eee;display:block}
.index{columns:14em;font-size:13px}.index a{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
nav{margin:.6em 0}nav a,nav strong{margin-right:.5em}
code{background:#f5f5f5;padding:0 .2em}
"""


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style></head><body>"
    )


def _pages(rows: list[ClassRow]) -> list[range]:
    """The row numbers of each page: consecutive runs of at most CLASSES_PER_PAGE (one empty page for no rows)."""
    return [range(i, min(i + CLASSES_PER_PAGE, len(rows))) for i in range(0, max(len(rows), 1), CLASSES_PER_PAGE)]


def _nav(pages: list[range], here: int) -> str:
    """Links to every page, this one in bold (nothing when there is one page)."""
    if len(pages) < 2:
        return ""
    items = [
        f"<strong>{p.start + 1}-{p.stop}</strong>"
        if k == here
        else f'<a href="{_e(_href(page_path(k), here))}">{p.start + 1}-{p.stop}</a>'
        for k, p in enumerate(pages)
    ]
    return '<nav class="pages">Classes ' + " ".join(items) + "</nav>"


def _classes_table(
    rows: list[ClassRow], numbers: range, page: int, thumbs: Collection[str], px: int, cfg: dict[str, Any]
) -> str:
    """The rows `numbers` of the class table, as seen from page `page`; a row's id is c<row number>."""
    body = []
    for i in numbers:
        r = rows[i]
        if r.images and r.name in thumbs:
            cols, nrows = _grid(r.images)
            cell = (
                f'<a href="{_e(_href(image_path(r.name, 0), page))}"><img loading="lazy" decoding="async" '
                f'width="{cols * px}" height="{nrows * px}" src="{_e(_href(thumb_path(r.name), page))}" '
                f'alt="{_e(f"{r.name}: {r.images} images")}"></a>'
            )
        elif r.images:  # finished, thumbnail not written (it could not be read back): say so, link the images
            cell = f'<a href="{_e(_href(image_path(r.name, 0), page))}">{r.images} images</a>'
        else:
            cell = _e(r.note or ("statistics only" if cfg.get("stats_only") else "not distilled"))
        used = "" if r.used is None else str(r.used)
        body.append(
            f'<tr id="c{i}"><td>{_e(r.name)}</td><td>{used}</td><td>{_score(r.score)}</td>'
            f'<td class="thumbs">{cell}</td></tr>'
        )
    head = "".join(f"<th>{h}</th>" for h in ("class", "inputs used", "score", "images"))
    return f'<table class="classes"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _summary(manifest: Manifest, rows: list[ClassRow], links: list[str]) -> list[str]:
    """The first page's top: status and counts, reasons, files, timings, resume, skips, settings, versions."""
    status, cfg = manifest.status, manifest.config
    parts = [
        "<h1>D3HR distilled set</h1>",
        f'<p>Status: <strong class="status-{_e(status)}">{_e(status)}</strong>. '
        f"{sum(r.images for r in rows)} images of {sum(1 for r in rows if r.images)} classes "
        f"({_e(cfg.get('ipc', ''))} a class) from <code>{_e(cfg.get('data') or cfg.get('from_stats') or '')}</code> "
        f'with <code>{_e(cfg.get("model", ""))}</code>. <a href="#index">Classes ({len(rows)})</a></p>',
    ]
    if manifest.statistics_from:
        parts.append(f"<p>Statistics from <code>{_e(manifest.statistics_from)}</code>.</p>")
    if manifest.reasons:
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in manifest.reasons) + "</ul>")
    if links:
        parts.append("<p>Files: " + " · ".join(f'<a href="{_e(_href(rel))}">{_e(rel)}</a>' for rel in links) + "</p>")
    if manifest.stages:
        parts.append("<h2>Timings</h2>")
        parts.append(
            _table(
                ["stage", "items", "seconds", "items/s"],
                [
                    [_e(k), _e(v.get("items", "")), _e(v.get("seconds", "")), _e(v.get("items_per_s", ""))]
                    for k, v in manifest.stages.items()
                ],
            )
        )
    resume = manifest.resume
    if resume:
        parts.append("<h2>Resume</h2>")
        resumed = "yes: this run continued an earlier one" if resume.get("resumed") else "no: a fresh run"
        body = [
            [_e(kind), *(_e(v.get(x, "")) for x in ("total", "reused", "computed"))]
            for kind, v in resume.items()
            if isinstance(v, dict)
        ]
        parts.append(f"<p>Resumed: {resumed}.</p>" + _table(["work", "total", "reused", "computed"], body))
    skipped = manifest.skipped
    parts.append(f"<h2>Skipped inputs ({len(skipped)})</h2>")
    if skipped:
        reasons = Counter(str(s["reason"]) for s in skipped)
        parts.append(_table(["reason", "inputs"], [[_e(k), str(n)] for k, n in reasons.most_common()]))
        shown = skipped[:SKIPS_SHOWN]
        more = f" ({len(skipped) - SKIPS_SHOWN} more in manifest.json)" if len(skipped) > SKIPS_SHOWN else ""
        parts.append(
            f"<details><summary>The first {len(shown)} by name{more}</summary>"
            + _table(["input", "reason"], [[_e(s.get("input", "")), _e(s.get("reason", ""))] for s in shown])
            + "</details>"
        )
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["setting", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in cfg.items()]))
    if manifest.resolved:
        parts.append("<h2>Resolved</h2>")
        parts.append(
            _table(["what", "value"], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in manifest.resolved.items()])
        )
    if manifest.versions:
        parts.append("<p>Versions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in manifest.versions.items()) + ".</p>")
    return parts


def render(
    manifest: Manifest,
    rows: list[ClassRow],
    links: list[str],
    output_size: int | None,
    thumbs: Collection[str] = frozenset(),
) -> dict[str, str]:
    """The report's pages: {path relative to the output: complete HTML document}, report.html first.

    Args:
        manifest: the run's manifest.
        rows: the classes (rows_from_state).
        links: files of the output to link (relative paths that exist).
        output_size: the side of the distilled images in pixels (a thumbnail shows THUMB_MIN_PX..THUMB_PX).
        thumbs: names of the classes whose thumbnail strip exists (the others' rows link their images as text).
    """
    cfg = manifest.config
    px = max(THUMB_MIN_PX, min(int(output_size or THUMB_PX), THUMB_PX))
    pages = _pages(rows)
    title = f"D3HR distilled set: {cfg.get('output', '')}"
    first = [_head(title), *_summary(manifest, rows, links)]
    # The index: every class, one link each, to its row on whichever page holds it.
    first.append(f'<h2 id="index">Classes ({len(rows)})</h2>')
    if len(pages) > 1:
        links_of = (
            f'<a href="{"" if i < CLASSES_PER_PAGE else _e(_href(page_path(i // CLASSES_PER_PAGE)))}#c{i}">'
            f"{_e(r.name)}</a>"
            for i, r in enumerate(rows)
        )
        first.append('<div class="index">' + "".join(links_of) + "</div>")
    out: dict[str, str] = {}
    for k, numbers in enumerate(pages):
        parts = first if k == 0 else [_head(f"{title} (classes {numbers.start + 1}-{numbers.stop})")]
        if k:
            back = _e(_href(REPORT_FILE, k))
            parts.append(
                f"<h1>D3HR distilled set: classes {numbers.start + 1}-{numbers.stop} of {len(rows)}</h1>"
                f'<p><a href="{back}">Summary</a> · <a href="{back}#index">class index</a></p>'
            )
        parts += [_nav(pages, k), _classes_table(rows, numbers, k, thumbs, px, cfg), _nav(pages, k)]
        parts.append("</body></html>\n")
        out[page_path(k)] = "\n".join(p for p in parts if p)
    return out


def _write_thumbs(out: OutputDir, state: RunState, names: dict[int, str], finished: set[int], side: int) -> set[str]:
    """The strips of the finished classes that have none yet (one listing of report/thumbs/, then a state file read
    and a strip written a class); the names of the classes that have one."""
    have = set(out.list(THUMBS_DIR))
    done = {names[c] for c in finished if c in names and thumb_path(names[c]).rsplit("/", 1)[1] in have}
    todo = sorted(c for c in finished if c in names and names[c] not in done)
    for c, (_, pngs, _) in state.iter_classes(todo):
        out.write_bytes(thumb_path(names[c]), thumb_strip(pngs, side))
        done.add(names[c])
    return done


def write_report(
    out: OutputDir,
    manifest: Manifest,
    names: dict[int, str],
    state: RunState,
    output_size: int | None,
    stats_count: Sequence[int] | np.ndarray | None = None,
) -> str:
    """report.html, its pages and the missing thumbnails into `out` (an storage.fs.OutputDir), from the manifest and the
    per-class state; the location of report.html. Pages of an earlier report beyond this one's are removed."""
    ipc = manifest.ipc
    finished = state.finished_classes() if ipc else set()
    rows = rows_from_state(manifest, names, finished, ipc, stats_count)
    side = min(int(output_size or THUMB_PX), THUMB_PX)
    thumbs = _write_thumbs(out, state, names, finished, side) if ipc else set()
    links = [rel for rel in LINKED_FILES if out.exists(rel)]
    pages = render(manifest, rows, links, output_size, thumbs)
    for rel in sorted(pages, key=lambda rel: rel == REPORT_FILE):  # report.html last: it links the others
        out.write_bytes(rel, pages[rel].encode("utf-8"))
    for name in out.list(REPORT_DIR):
        if name.startswith("page-") and f"{REPORT_DIR}/{name}" not in pages:
            out.remove(f"{REPORT_DIR}/{name}")
    return out.path(REPORT_FILE)
