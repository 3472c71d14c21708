"""artifacts/report.py: timings add up and print, the report's resume record, progress lines, the manifest."""

import json
import math

import pytest

from d3hr_ray.artifacts.report import Manifest, Progress, Resumed, RunReport, Timings


def test_timings_add_merge_and_print():
    t = Timings()
    t.add("encode", 10, 2.0)
    t.add("encode", 6, 2.0)
    other = Timings()
    other.add("select", 3, 0.0)
    t.merge(other)
    assert t.stages == {"encode": (16, 4.0), "select": (3, 0.0)}
    assert t.as_dict() == {
        "encode": {"items": 16, "seconds": 4.0, "items_per_s": 4.0},
        "select": {"items": 3, "seconds": 0.0, "items_per_s": None},
    }
    lines = t.table().splitlines()
    assert lines[0].split() == ["stage", "items", "seconds", "items/s"]
    assert lines[1].split() == ["encode", "16", "4.00", "4.0"] and math.isnan(float(lines[2].split()[-1]))


def test_report_resume_record_and_failure():
    r = RunReport(resumed=True, shards=Resumed(10, 7))
    assert r.resume_dict() == {"resumed": True, "shards": {"total": 10, "reused": 7, "computed": 3}}
    r.fail(RuntimeError("line one\nline two"))
    assert r.status == "failed" and r.reasons == ["line one"]
    r.fail(KeyboardInterrupt())
    assert r.reasons[-1] == "KeyboardInterrupt"


def test_progress_prints_the_start_and_the_last_step(capsys):
    p = Progress("statistics", "shards", 3, 1)
    p.step(5)
    p.step(5)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "statistics: 3 shards, 1 already done, 2 to compute"
    assert out[-1].startswith("statistics: 3/3 shards (100%)")


def test_the_manifest_writes_the_keys_of_manifest_json_and_reads_them_back():
    from d3hr_ray.config import DistillConfig

    report = RunReport(resumed=True, shards=Resumed(4, 3), status="complete")
    report.counts = {"a": {"read": 5, "used": 4, "skipped": 1}}
    report.skipped = [{"input": "x/1.png", "class": "a", "reason": "corrupt image"}]
    report.timings.add("select (actor s)", 10, 2.0)
    cfg = DistillConfig(stats_per_class=4)
    m = Manifest.build(cfg, report, {"device": "cpu"}, {3: "c", 0: "a"}, {"per_class": 4, "inputs": 8}, {"ray": "2"})
    data = m.to_json()
    assert list(data) == [
        "status", "reasons", "undistilled", "config", "resolved", "class_names", "class_ids", "counts", "skipped",
        "scores", "resume", "stages", "versions", "statistics_from", "stats_subset", "version",
    ]  # fmt: skip
    assert data["version"] == 2
    assert data["class_names"] == ["a", "c"] and data["class_ids"] == [0, 3] and data["config"] == cfg.to_dict()
    assert Manifest.from_json(json.loads(json.dumps(data))) == m
    assert m.metrics() == {
        "select_actor_s/seconds": 2.0,
        "select_actor_s/items_per_s": 5.0,
        "images_read": 5,
        "images_used": 4,
        "images_skipped": 1,
        "classes_undistilled": 0,
    }
    report.selected_keys = {"a": ["k1"]}
    assert Manifest.build(cfg, report, {}, {0: "a"}, None, {}).to_json()["selected_keys"] == {"a": ["k1"]}


def test_an_early_manifest_reads_with_empty_values_and_its_skips_as_records():
    m = Manifest.from_json({"status": "complete", "config": {"ipc": 3}, "skipped": [["x/1.png", 2, "corrupt image"]]})
    assert m.skipped == [{"input": "x/1.png", "class": None, "reason": "corrupt image"}]
    assert m.counts == {} and m.resume == {} and m.statistics_from is None and m.ipc == 3
    assert Manifest.from_json({"config": {"ipc": 3, "stats_only": True}}).ipc == 0


def test_a_manifest_of_a_newer_format_is_refused_by_name():
    with pytest.raises(ValueError, match=r"manifest.json has version 3; this d3hr_ray reads versions 1 to 2"):
        Manifest.from_json({"status": "complete", "version": 3})
