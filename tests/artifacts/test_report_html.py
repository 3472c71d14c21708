"""report_html.py: the pages parsed back with the standard library's HTML parser and checked against the files; the
thumbnails against the images, decoded with PIL; a 1,000-class report's size; both opened in headless Chromium."""

import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from d3hr_ray.artifacts.outputs import class_folder
from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.artifacts.report_html import ClassRow, render, rows_from_state, write_report
from d3hr_ray.storage.fs import OutputDir
from tests.browser import Browser, chromium
from tests.cifar_slice import CLASSES, needs_cifar

HOSTILE = '.<img src=x onerror="alert(1)">&amp; </script>#?%41'
needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)"
)


class _Page(HTMLParser):
    """The tags, ids, every URL-valued attribute, and the class table's rows (cell texts, the thumbnails' src and
    the links of each)."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.rows, self.links, self.ids, self.index = [], [], [], [], set(), []
        self._table = None  # the class attribute of the table being read
        self._cell = None
        self._row = None
        self._div = []  # the class attributes of the open divs

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "div":
            self._div.append(a.get("class"))
        if tag == "table":
            self._table = a.get("class")
        elif tag == "tr" and self._table == "classes":
            self._row = {"cells": [], "images": [], "lazy": [], "hrefs": [], "id": a.get("id")}
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img" and self._row is not None:
            self._row["images"].append(a["src"])
            self._row["lazy"].append(a.get("loading"))
        elif tag == "a" and self._row is not None:
            self._row["hrefs"].append(a["href"])
        elif tag == "a" and "index" in self._div:
            self.index.append(a["href"])
        elif tag == "a" and self._table is None and "href" in a:
            self.links.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row["cells"].append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "div" and self._div:
            self._div.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_report(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _pages_of(out: Path) -> list[Path]:
    """report.html, then report/page-2.html, page-3.html, ... in order."""
    rest = sorted((out / "report").glob("page-*.html"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    return [out / "report.html", *rest]


def _cells(strip: Image.Image, n: int) -> tuple[int, list[np.ndarray]]:
    """(side, the n cells) of a thumbnail strip: at most 10 a row, square cells, image k at (k // 10, k % 10)."""
    cols = min(10, n)
    side = strip.size[0] // cols
    assert strip.size == (cols * side, math.ceil(n / cols) * side)
    a = np.asarray(strip.convert("RGB"), dtype=np.float64)
    return side, [
        a[(k // cols) * side : (k // cols + 1) * side, (k % cols) * side : (k % cols + 1) * side] for k in range(n)
    ]


def check_report(out: Path, expected: dict[str, int], max_grey_diff: float = 12.0) -> _Page:
    """The report in `out` against the files: a row per class in `expected` (name -> images on disk), in order,
    over all pages; a class's thumbnail shows its images in order (each image resized with PIL here, the mean
    absolute difference per pixel at most `max_grey_diff` grey levels: WebP is lossy at 32 px and more); every URL
    is relative, stays in the output and names a file in it; every #fragment names an id of its page; nothing runs.
    Returns the first page, its `rows` those of all pages, each with "files": the images its thumbnail showed."""
    pages = _pages_of(out)
    parsed = {p.resolve(): parse_report(p.read_text(encoding="utf-8")) for p in pages}
    rows = []
    for path, page in parsed.items():
        assert not {"script", "iframe", "link", "object", "embed"} & set(page.tags)
        assert len(page.rows) <= 100
        for url in page.urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc and not url.startswith("/"), url  # nothing leaves the folder
            assert not parts.query, url  # '?' of class names was encoded
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path.resolve()
            assert out.resolve() in target.parents and target.is_file(), url
            if parts.fragment:
                assert target in parsed and parts.fragment in parsed[target].ids, url
        rows += page.rows
    assert [r["cells"][0] for r in rows] == list(expected)
    for row in rows:
        name, n = row["cells"][0], expected[row["cells"][0]]
        folder = out / "images" / class_folder(name)
        assert len(list(folder.glob("*.png")) if folder.is_dir() else []) == n
        row["files"] = [f"images/{class_folder(name)}/{k}.png" for k in range(n)]
        if not n:
            assert row["images"] == []
            continue
        (src,) = row["images"]
        assert row["lazy"] == ["lazy"]
        assert unquote(src).split("thumbs/", 1)[1] == f"{class_folder(name)}.webp"
        assert unquote(row["hrefs"][0]).endswith(row["files"][0])
        strip = Image.open(out / "report" / "thumbs" / f"{class_folder(name)}.webp")
        side, cells = _cells(strip, n)
        for rel, cell in zip(row["files"], cells, strict=True):
            im = Image.open(out / rel).convert("RGB")
            want = np.asarray(im.resize((side, side), Image.Resampling.LANCZOS) if im.size[0] != side else im, float)
            assert np.abs(cell - want).mean() <= max_grey_diff, rel
    first = parsed[pages[0].resolve()]
    first.rows = rows
    return first


def _manifest(status="complete", **extra) -> Manifest:
    return Manifest.from_json(
        {
            "status": status,
            "reasons": [],
            "undistilled": {},
            "config": {"ipc": 2, "data": "d", "model": "m", "output": "o", "stats_only": False},
            "counts": {"a": {"read": 5, "used": 4, "skipped": 1}, HOSTILE: {"read": 3, "used": 3, "skipped": 0}},
            "skipped": [{"input": "x/<b>.jpg", "shard": 0, "reason": "corrupt image"}],
            "scores": {"a": 1.5, HOSTILE: float("nan")},
            "resume": {"resumed": True, "shards": {"total": 4, "reused": 3, "computed": 1}},
            "stages": {"encode+invert+stats": {"items": 7, "seconds": 1.0, "items_per_s": 7.0}},
            **extra,
        }
    )


def _png(rgb, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), tuple(int(v) for v in rgb)).save(buf, format="PNG")
    return buf.getvalue()


class _State:
    """The per-class state as write_report reads it: finished ids, and each class's PNGs (records what is read)."""

    def __init__(self, pngs: dict[int, list[bytes]]):
        self.pngs, self.read = pngs, []

    def finished_classes(self):
        return set(self.pngs)

    def iter_classes(self, ids):
        for c in ids:
            self.read.append(c)
            yield c, (None, self.pngs[c], 0.0)


def _output(root: Path, names: dict[int, str], ipc: int, side: int = 8) -> _State:
    """An output's images on disk (each a flat colour of its own) and the state that holds them."""
    out = OutputDir(str(root))
    rng = np.random.default_rng(0)
    pngs = {c: [_png(rng.integers(0, 256, 3), side) for _ in range(ipc)] for c in names}
    for c, name in names.items():
        for k, png in enumerate(pngs[c]):
            out.write_bytes(f"images/{class_folder(name)}/{k}.png", png)
    return _State(pngs)


def test_a_page_of_two_classes_with_a_hostile_name(tmp_path):
    names = {0: "a", 3: HOSTILE}
    state = _output(tmp_path, names, ipc=2)
    out = OutputDir(str(tmp_path))
    out.write_bytes("distilled.parquet", b"x")
    out.write_bytes("manifest.json", b"{}")
    write_report(out, _manifest(), names, state, output_size=8)
    page = check_report(tmp_path, {"a": 2, HOSTILE: 2}, max_grey_diff=0)  # 8 px strips are lossless
    assert [r["cells"][1:3] for r in page.rows] == [["4", "1.500"], ["3", "n/a"]]  # inputs used, score
    files = [unquote(u) for u in page.links if "#" not in u]
    assert files == ["distilled.parquet", "manifest.json"]  # only the files that exist
    text = (tmp_path / "report.html").read_text()
    assert "<b>.jpg" not in text and "x/&lt;b&gt;.jpg" in text  # a skipped input's name is escaped as well
    assert "http" not in text.replace("http-equiv", "")
    assert not (tmp_path / "report" / "page-2.html").exists() and page.index == []  # one page: no index links
    # The summary comes before the classes.
    assert text.index("Timings") < text.index("Settings") < text.index('id="index"') < text.index('class="classes"')


def test_rows_follow_the_state_not_the_plan():
    """A class without its state file (a run stopped before it) shows no images; an undistilled class its reason;
    statistics from a file give the counts when the manifest has none."""
    m = _manifest("failed", undistilled={"b": "1 usable input (needs 2)"}, counts={})
    rows = rows_from_state(m, {0: "a", 1: HOSTILE}, finished={1}, ipc=2, stats_count=[7, 9, 1])
    assert rows[:2] == [ClassRow("a", 7, 0, 1.5), ClassRow(HOSTILE, 9, 2, rows[1].score)]
    assert math.isnan(rows[1].score)
    assert rows[2] == ClassRow("b", None, 0, None, "1 usable input (needs 2)")
    (text,) = render(m, rows, [], 8, thumbs={HOSTILE}).values()
    page = parse_report(text)
    assert [r["cells"][3] for r in page.rows] == ["not distilled", "", "1 usable input (needs 2)"]
    assert [len(r["images"]) for r in page.rows] == [0, 1, 0]


def test_stats_only_rows_say_so(tmp_path):
    m = _manifest(config={"ipc": 10, "stats_only": True})
    write_report(OutputDir(str(tmp_path)), m, {0: "a"}, _State({0: []}), output_size=None)
    page = parse_report((tmp_path / "report.html").read_text())
    assert page.rows[0]["cells"] == ["a", "4", "1.500", "statistics only"] and page.rows[0]["images"] == []
    assert not (tmp_path / "report" / "thumbs").exists()


def test_thumbnails_are_written_once_and_stale_pages_removed(tmp_path):
    names = {c: f"class {c}" for c in range(150)}
    state = _output(tmp_path, names, ipc=3, side=40)  # 40 px: lossy strips
    out = OutputDir(str(tmp_path))
    m = Manifest.from_json({"status": "complete", "config": {"ipc": 3}})
    write_report(out, m, names, state, output_size=40)
    assert sorted(state.read) == list(range(150)) and (tmp_path / "report" / "page-2.html").is_file()
    check_report(tmp_path, {n: 3 for n in names.values()})
    thumb = tmp_path / "report" / "thumbs" / "class 7.webp"
    before = (thumb.stat().st_ino, thumb.stat().st_mtime_ns)
    state.read.clear()
    write_report(out, m, dict(list(names.items())[:50]), state, output_size=40)  # a report of fewer classes
    assert state.read == [] and (thumb.stat().st_ino, thumb.stat().st_mtime_ns) == before  # not rewritten
    assert not (tmp_path / "report" / "page-2.html").exists()  # the earlier report's second page is gone


def _thousand(ipc: int = 50) -> tuple[dict[int, str], Manifest]:
    """1,000 class names (a hostile one first, '#' and '?' ones on later pages) and a manifest of a complete run
    with 30 skipped inputs, every setting, counts and scores."""
    names = {c: f"n{c:08d} class number {c}" for c in range(1000)}
    names.update({0: HOSTILE, 150: "a#b", 420: "what?", 999: "..", 500: "T-shirt/top"})
    cfg = {"ipc": ipc, "data": "s3://bucket/imagenet/train", "model": "facebook/DiT-XL-2-256", "output": "o"}
    cfg.update({f"setting_{i}": i for i in range(40)})
    manifest = {
        "status": "complete",
        "reasons": [],
        "config": cfg,
        "counts": {n: {"read": 1300, "used": 1299, "skipped": 1} for n in names.values()},
        "scores": {n: 0.123456 for n in names.values()},
        "skipped": [{"input": f"s3://bucket/imagenet/train/x/{i}.JPEG", "reason": "corrupt image"} for i in range(30)],
        "resume": {"resumed": False, "shards": {"total": 1252, "reused": 0, "computed": 1252}},
        "stages": {"encode+invert+stats": {"items": 1_281_167, "seconds": 9000.0, "items_per_s": 142.3}},
    }
    return names, Manifest.from_json(manifest)


def test_a_thousand_classes_of_50_make_pages_of_100_and_a_first_page_under_500_kb():
    names, manifest = _thousand()
    rows = rows_from_state(manifest, names, set(names), 50)
    pages = render(manifest, rows, ["distilled.parquet"], 224, thumbs=set(names.values()))
    assert list(pages) == ["report.html", *(f"report/page-{k}.html" for k in range(2, 11))]
    assert len(pages["report.html"].encode()) <= 500_000
    parsed = {rel: parse_report(text) for rel, text in pages.items()}
    assert [len(p.rows) for p in parsed.values()] == [100] * 10
    assert all(len(p.rows[0]["images"]) == 1 for p in parsed.values())  # one thumbnail strip a class
    # The index: one link a class, in order, to the row of that class on the page that holds it.
    first = parsed["report.html"]
    assert len(first.index) == 1000
    for i, href in enumerate(first.index):
        target, _, anchor = unquote(href).partition("#")
        page = parsed[target or "report.html"]
        (row,) = [r for r in page.rows if r["id"] == anchor]
        assert row["cells"][0] == names[i]


@needs_chromium
def test_a_thousand_classes_in_chromium(tmp_path):
    """The synthetic 1,000-class output opened in a browser: every thumbnail of the first page loads, the index
    links land on rows that exist (on this page and the next), the hostile name is text, nothing runs."""
    names, manifest = _thousand(ipc=5)
    out_dir = tmp_path / "out"
    state = _output(out_dir, names, ipc=5)
    write_report(OutputDir(str(out_dir)), manifest, names, state, output_size=8)
    check_report(out_dir, {names[c]: 5 for c in sorted(names)}, max_grey_diff=0)
    with Browser(tmp_path / "profile", timeout_s=180) as b:
        b.open(out_dir / "report.html")
        seen = _load_every_image(b)
        assert len(seen) == 100 and all(w > 0 for _, w in seen), [s for s in seen if s[1] == 0][:5]
        assert b.eval("document.querySelectorAll('script, img[src=x]').length") == 0
        assert b.eval("document.querySelector('#c0 td').textContent") == HOSTILE
        assert b.eval("document.querySelector('h1').getBoundingClientRect().top") < 100  # the summary first
        b.screenshot(tmp_path / "thousand-top.png")
        hrefs = b.eval("[...document.querySelectorAll('.index a')].map(a => a.href)")
        assert len(hrefs) == 1000
        for href in hrefs[:3] + hrefs[149:151]:  # this page's rows and page 2's ('a#b' among them)
            b.open(href)
            got = b.eval(
                "(() => { const r = document.getElementById(location.hash.slice(1)); "
                "return r && [r.querySelector('td').textContent, r.getBoundingClientRect().top]; })()"
            )
            assert got is not None and got[0] == names[int(href.rsplit("#c", 1)[1])], href
            assert -2 < got[1] < 900, href  # scrolled to the row (its top border may sit a fraction above)
        seen = _load_every_image(b)
        assert len(seen) == 100 and all(w > 0 for _, w in seen)
        b.screenshot(tmp_path / "thousand-page-2.png")


_LOAD_ALL = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const seen = [];
  for (const img of document.images) {
    img.scrollIntoView({block: 'center'});
    const deadline = Date.now() + 20000;
    while (!img.complete && Date.now() < deadline) await sleep(20);
    seen.push([img.getAttribute('src'), img.naturalWidth]);
  }
  scrollTo(0, 0);
  return seen;
})()"""


def _load_every_image(b: Browser) -> list:
    """Scroll to each image in turn (the thumbnails are lazy) until it loads or fails: [(src, naturalWidth)] of every
    img (0: broken)."""
    return b.eval(_LOAD_ALL)


@needs_cifar
@needs_chromium
def test_the_report_of_a_run_in_chromium(first_run, tmp_path):
    """The report of the CIFAR slice's run, in a browser: its four classes, each thumbnail loaded at the size of
    its grid of 32 px cells, the files linked."""
    _, out = first_run
    check_report(out, {c: 3 for c in CLASSES})
    with Browser(tmp_path / "profile") as b:
        b.open(out / "report.html")
        seen = _load_every_image(b)
        assert len(seen) == len(CLASSES) and all(w == 3 * 32 for _, w in seen), seen
        names = b.eval(
            "[...document.querySelectorAll('table.classes tbody tr td:first-child')].map(t => t.textContent)"
        )
        assert names == CLASSES
        files = b.eval("[...document.querySelectorAll('p a')].map(a => a.textContent)")
        assert {"distilled.parquet", "README.md", "manifest.json"} <= set(files)
        b.eval("document.getElementById('index').scrollIntoView()")
        b.screenshot(tmp_path / "run-classes.png")
