"""artifacts/state.py: the run's identity check and the block and class files, local and on S3 (moto)."""

import json
import os

import numpy as np
import pytest
import torch

from d3hr_ray.artifacts.state import RunState, StateMismatch, config_diff
from d3hr_ray.storage.fs import OutputDir
from tests.conftest import S3_TEST_ENV

KEY = {"model": "m", "data": "d", "steps": 50, "seed": 0}
GEN = {"ipc": 10, "candidates": 100}
LISTING = {"kind": "imagefolder", "shards": 2, "counts": {"a": 3, "b": 4}}


def test_config_diff_names_changed_added_and_removed_keys():
    assert config_diff({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == ["b", "c", "d"]


def test_begin_records_then_accepts_the_same_settings(tmp_path):
    state = RunState(OutputDir(str(tmp_path)))
    assert state.begin(KEY, LISTING, None, block=3) == {"resumed": False, "block": 3}
    # --stats-only first, then the full run adds its generation keys; the block size recorded first is kept
    assert state.begin(KEY, LISTING, GEN, block=5) == {"resumed": True, "block": 3}
    assert json.loads((tmp_path / "_state" / "run.json").read_text())["generate"] == GEN
    assert state.begin(KEY, LISTING, None) == {"resumed": True, "block": 3}  # a later --stats-only keeps them


def test_version_1_state_resumes_as_blocks_of_one_shard(tmp_path):
    """A run.json of version 1 (no block size) with its per-shard files under _state/shards/."""
    (tmp_path / "_state").mkdir()
    v1 = {"version": 1, "stats": KEY, "listing": LISTING, "generate": GEN}
    (tmp_path / "_state" / "run.json").write_text(json.dumps(v1))
    old = RunState(OutputDir(str(tmp_path)))
    old._blocks_dir = "shards"  # where version 1 wrote its shard files
    old.write_block(1, _PARTIAL, {2: 3}, [])
    state = RunState(OutputDir(str(tmp_path)))
    assert state.begin(KEY, LISTING, GEN, block=8) == {"resumed": True, "block": 1}
    assert state.finished_blocks() == {1} and state.read_block(1)[1] == {2: 3}
    assert state.shard_classes() == {1: [2, 5]}  # a version 1 file is one shard's: its classes are the partial's
    assert json.loads((tmp_path / "_state" / "run.json").read_text()) == v1  # left as version 1
    (tmp_path / "_state" / "run.json").write_text(json.dumps({**v1, "version": 99}))
    with pytest.raises(StateMismatch, match="another d3hr_ray version"):
        RunState(OutputDir(str(tmp_path))).begin(KEY, LISTING, GEN)


@pytest.mark.parametrize("change", [{"steps": 40}, {"seed": 1}, {"data": "other"}])
def test_begin_refuses_other_statistics_settings_naming_the_keys(tmp_path, change):
    state = RunState(OutputDir(str(tmp_path)))
    state.begin(KEY, LISTING, GEN)
    with pytest.raises(StateMismatch) as e:
        state.begin({**KEY, **change}, LISTING, GEN)
    assert f"{next(iter(change))} differ" in str(e.value) and "--overwrite" in str(e.value)


def test_begin_refuses_other_generation_settings_and_a_changed_listing(tmp_path):
    state = RunState(OutputDir(str(tmp_path)))
    state.begin(KEY, LISTING, GEN)
    with pytest.raises(StateMismatch, match="candidates, ipc differ"):
        state.begin(KEY, LISTING, {"ipc": 50, "candidates": 7})
    with pytest.raises(StateMismatch, match="--data changed"):
        state.begin(KEY, {**LISTING, "counts": {"a": 3, "b": 5}}, GEN)


def test_begin_refuses_a_finished_output_without_state(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(StateMismatch, match="no resumable state"):
        RunState(OutputDir(str(tmp_path))).begin(KEY, LISTING, GEN)


_PARTIAL = {
    "classes": torch.tensor([2, 5]),
    "count": torch.tensor([3, 4]),
    "mean": torch.arange(6, dtype=torch.float64).view(2, 3),
    "m2": torch.ones(2, 3, dtype=torch.float64),
}


def _block_roundtrip(state: RunState):
    partial = _PARTIAL
    skipped = [["a/x.jpg", 2, "corrupt image"], ["T-shirt/top/ü ..", 5, "empty file"]]
    state.write_block(7, partial, {2: 4, 5: 4}, skipped)
    state.write_block(3, partial, {}, [])
    assert state.finished_blocks() == {3, 7}
    got, read, skip = state.read_block(7)
    for k in partial:
        assert torch.equal(got[k], partial[k])
    assert read == {2: 4, 5: 4} and skip == skipped
    assert [i for i, _ in state.iter_blocks([7, 3])] == [7, 3]
    state.write_block(8, partial, {}, [], {20: [2], 21: [2, 5], 22: [5]})
    assert state.shard_classes() == {3: [2, 5], 7: [2, 5], 20: [2], 21: [2, 5], 22: [5]}
    assert RunState(state.out).read_block(8)[0]["classes"].tolist() == [2, 5]


def _class_roundtrip(state: RunState):
    lat = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    pngs = [b"\x89PNG one", b"", b"three"]
    state.write_class(4, lat, pngs, 1.25)
    state.write_class(0, lat, pngs, float("nan"))
    assert state.finished_classes() == {0, 4}
    got, got_pngs, score = state.read_class(4)
    np.testing.assert_array_equal(got, lat)
    assert got_pngs == pngs and score == 1.25
    assert np.isnan(state.read_class(0)[2])


def test_block_and_class_files_round_trip_locally(tmp_path):
    state = RunState(OutputDir(str(tmp_path)))
    _block_roundtrip(state)
    _class_roundtrip(state)
    assert state.class_keys(4) is None
    state.write_class(2, np.zeros((2, 8), np.float32), [b"a", b"b"], 0.5, keys=["x/1.png", "y:7"])
    assert state.class_keys(2) == ["x/1.png", "y:7"] and state.read_class(2)[2] == 0.5
    z = torch.randn(5, 8)
    state.write_latents(9, z, [0, 0, 3, 1, 3], [f"k{i}" for i in range(5)])
    got, labels, keys = state.read_latents(9)
    assert got.dtype == torch.float16 and torch.equal(got, z.half())
    assert labels.tolist() == [0, 0, 3, 1, 3] and keys == [f"k{i}" for i in range(5)]
    assert state.finished_latents() == {9}
    assert not list(tmp_path.rglob("*.tmp"))


def test_state_on_s3(s3_server, monkeypatch):
    import boto3

    for k, v in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="state")
    out = OutputDir("s3://state/run")
    state = RunState(out)
    assert state.begin(KEY, LISTING, GEN) == {"resumed": False, "block": 1}
    _block_roundtrip(state)
    _class_roundtrip(state)
    assert state.begin(KEY, LISTING, GEN) == {"resumed": True, "block": 1}
    out.remove("_state")
    assert state.finished_blocks() == set() and state.load_run() is None
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server


def test_shard_classes_reads_only_the_headers_of_version_2_block_files(tmp_path, monkeypatch):
    state = RunState(OutputDir(str(tmp_path)))
    state.begin(KEY, LISTING, GEN, block=2)
    state.write_block(0, _PARTIAL, {2: 1, 5: 1}, [], {0: [2], 1: [2, 5]})
    state.write_block(1, _PARTIAL, {2: 1}, [], {2: [5]})

    def whole_file(block):
        raise AssertionError("shard_classes read a whole block file")

    monkeypatch.setattr(state, "_read_block_file", whole_file)
    assert state.shard_classes() == {0: [2], 1: [2, 5], 2: [5]}
