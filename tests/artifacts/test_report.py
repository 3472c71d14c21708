"""artifacts/report.py: timings add up and print, the report's resume record, progress lines."""

import math

from d3hr_ray.artifacts.report import Progress, Resumed, RunReport, Timings


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
