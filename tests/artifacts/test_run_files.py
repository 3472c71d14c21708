"""artifacts/run_files.py: manifest.json, README.md and report.html in every outcome; a failed run keeps its error."""

import json

import pytest

from d3hr_ray.artifacts import run_files
from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.storage.fs import OutputDir


def _manifest(status: str) -> Manifest:
    return Manifest.from_json({"status": status, "config": {"ipc": 2}, "class_ids": [0], "class_names": ["a"]})


def test_the_three_files_are_written(tmp_path):
    out = OutputDir(str(tmp_path))
    run_files.write_run_files(out, _manifest("complete"), {0: "a"}, RunState(out), 8, None)
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "complete"
    assert (tmp_path / "README.md").is_file() and (tmp_path / "report.html").is_file()


def test_a_failed_run_that_cannot_write_them_warns_and_any_other_raises(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_files, "write_manifest", broken)
    monkeypatch.setattr(run_files, "write_report", broken)
    out = OutputDir(str(tmp_path))
    run_files.write_run_files(out, _manifest("failed"), {0: "a"}, RunState(out), 8, None)
    err = capsys.readouterr().err
    assert "could not write manifest.json (OSError: disk full)" in err
    assert "could not write README.md or report.html (OSError: disk full)" in err
    with pytest.raises(OSError, match="disk full"):
        run_files.write_run_files(out, _manifest("complete"), {0: "a"}, RunState(out), 8, None)


def test_nothing_goes_to_mlflow_without_a_run(tmp_path):
    run_files.log_run(None, OutputDir(str(tmp_path)), _manifest("complete"))  # no client, no error
