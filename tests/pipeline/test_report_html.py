"""report_html.py: the page parsed back with the standard library's HTML parser, checked against the files."""

import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from d3hr_ray.io.fs import OutputDir
from d3hr_ray.pipeline.outputs import class_folder
from d3hr_ray.pipeline.report_html import ClassRow, render, rows_from_state, write_report

HOSTILE = '.<img src=x onerror="alert(1)">&amp; </script>#?%41'


class _Page(HTMLParser):
    """The tags, every URL-valued attribute, and the class table's rows (cell texts and the images of each)."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.rows, self.links = [], [], [], []
        self._table = None  # the class attribute of the table being read
        self._cell = None
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "table":
            self._table = a.get("class")
        elif tag == "tr" and self._table == "classes":
            self._row = {"cells": [], "images": [], "lazy": []}
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img" and self._row is not None:
            self._row["images"].append(a["src"])
            self._row["lazy"].append(a.get("loading"))
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

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_report(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def check_report(out: Path, expected: dict[str, int]) -> _Page:
    """report.html in `out` against the files: a row per class in `expected` (name -> images on disk), every
    image it shows is that class's file, every URL is relative and names a file in `out`; nothing runs."""
    page = parse_report((out / "report.html").read_text(encoding="utf-8"))
    assert "script" not in page.tags and "iframe" not in page.tags and "link" not in page.tags
    for url in page.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and not url.startswith("/"), url  # no request leaves the folder
        assert not parts.query and not parts.fragment, url  # '?' and '#' of class names were encoded
        assert (out / unquote(parts.path)).is_file(), url
    assert [r["cells"][0] for r in page.rows] == list(expected)
    for row in page.rows:
        name = row["cells"][0]
        folder = out / "images" / class_folder(name)
        assert [unquote(u) for u in row["images"]] == [
            f"images/{class_folder(name)}/{k}.png" for k in range(expected[name])
        ]
        assert all(lazy == "lazy" for lazy in row["lazy"])
        assert len(list(folder.glob("*.png")) if folder.is_dir() else []) == expected[name]
    return page


def _manifest(status="complete", **extra):
    return {
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


class _State:
    def __init__(self, finished):
        self.finished = set(finished)

    def finished_classes(self):
        return self.finished


def test_a_page_of_two_classes_with_a_hostile_name(tmp_path):
    names = {0: "a", 3: HOSTILE}
    out = OutputDir(str(tmp_path))
    for name in names.values():
        for k in range(2):
            out.write_bytes(f"images/{class_folder(name)}/{k}.png", b"png")
    out.write_bytes("distilled.parquet", b"x")
    out.write_bytes("manifest.json", b"{}")
    write_report(out, _manifest(), names, _State({0, 3}), output_size=8)
    page = check_report(tmp_path, {"a": 2, HOSTILE: 2})
    assert [r["cells"][1:3] for r in page.rows] == [["4", "1.500"], ["3", "n/a"]]  # inputs used, score
    assert [unquote(u) for u in page.links] == ["distilled.parquet", "manifest.json"]  # only the files that exist
    text = (tmp_path / "report.html").read_text()
    assert "<b>.jpg" not in text and "x/&lt;b&gt;.jpg" in text  # a skipped input's name is escaped as well
    assert "http" not in text.replace("http-equiv", "")


def test_rows_follow_the_state_not_the_plan():
    """A class without its state file (a run stopped before it) shows no images; an undistilled class its reason;
    statistics from a file give the counts when the manifest has none."""
    m = _manifest("failed", undistilled={"b": "1 usable input (needs 2)"}, counts={})
    rows = rows_from_state(m, {0: "a", 1: HOSTILE}, finished={1}, ipc=2, stats_count=[7, 9, 1])
    assert rows[:2] == [ClassRow("a", 7, 0, 1.5), ClassRow(HOSTILE, 9, 2, rows[1].score)]
    assert math.isnan(rows[1].score)
    assert rows[2] == ClassRow("b", None, 0, None, "1 usable input (needs 2)")
    page = parse_report(render(m, rows, [], 8))
    assert [r["cells"][3] for r in page.rows] == ["not distilled", "", "1 usable input (needs 2)"]
    assert [len(r["images"]) for r in page.rows] == [0, 2, 0]


def test_stats_only_rows_say_so(tmp_path):
    m = _manifest(config={"ipc": 10, "stats_only": True})
    write_report(OutputDir(str(tmp_path)), m, {0: "a"}, _State({0}), output_size=None)
    page = parse_report((tmp_path / "report.html").read_text())
    assert page.rows[0]["cells"] == ["a", "4", "1.500", "statistics only"] and page.rows[0]["images"] == []
