"""artifacts/outputs.py: safe class folders, the streamed latents file, and assembly from class states."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import load_file

from d3hr_ray.artifacts.outputs import StatsMeta, assemble, class_folder, image_path, read_stats, write_stats
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.storage.fs import OutputDir

AWKWARD = [
    "T-shirt/top",
    "..",
    ".",
    ".hidden",
    "a\\b",
    "ü ñ space",
    "100%",
    "%2F",
    "",
    "tab\tname",
    "x" * 300,
    "x" * 299 + "y",
]


def test_class_folders_are_single_safe_segments_and_distinct():
    folders = [class_folder(n) for n in AWKWARD]
    assert len(set(folders)) == len(AWKWARD)  # injective on these (a collision would merge two classes' images)
    for f in folders:
        assert f and "/" not in f and "\\" not in f and not f.startswith(".") and len(f.encode()) <= 200
        assert all(ord(ch) >= 32 for ch in f)
    assert class_folder("T-shirt/top") == "T-shirt%2Ftop" and class_folder("ü ñ space") == "ü ñ space"
    assert class_folder("airplane") == "airplane"


def test_image_paths_stay_inside_the_output(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    for n in AWKWARD:
        written = out.write_bytes(image_path(n, 0), b"x")
        assert (tmp_path / "out" / "images").resolve() in __import__("pathlib").Path(written).resolve().parents


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_assemble_builds_hf_parquet_latents_and_grid_from_class_states(tmp_path):
    out = OutputDir(str(tmp_path))
    state = RunState(out)
    names = {0: "T-shirt/top", 3: "..", 4: "ü"}
    rng = np.random.default_rng(1)
    want = {}
    for c in (4, 0, 3):  # written in any order; assembled in class-id order
        lat = rng.normal(size=(2, 2 * 2 * 2)).astype(np.float32)
        want[c] = lat
        state.write_class(c, lat, [_png(10 * c), _png(10 * c + 1)], float(c))
    files, scores = assemble(out, state, names, 2, (2, 2, 2))
    assert scores == {0: 0.0, 3: 3.0, 4: 4.0}
    lat = load_file(tmp_path / "latents.safetensors")
    assert lat["labels"].tolist() == [0, 0, 3, 3, 4, 4]
    np.testing.assert_array_equal(lat["latents"].numpy().reshape(6, -1), np.concatenate([want[0], want[3], want[4]]))
    table = pq.read_table(tmp_path / "distilled.parquet")
    assert table.column("class").to_pylist() == ["T-shirt/top"] * 2 + [".."] * 2 + ["ü"] * 2
    first = table.column("image")[0].as_py()
    assert first["path"] == "images/T-shirt%2Ftop/0.png" and Image.open(io.BytesIO(first["bytes"])).getpixel(
        (0, 0)
    ) == (0, 0, 0)
    hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]
    assert hf["_type"] == "ClassLabel" and hf["names"][:1] == ["T-shirt/top"] and hf["names"][3:] == ["..", "ü"]
    Image.open(tmp_path / "grid.png").load()
    assert (tmp_path / "distilled.parquet").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".d3hr-*"))


def test_assemble_refuses_a_class_state_of_another_ipc(tmp_path):
    out = OutputDir(str(tmp_path))
    state = RunState(out)
    state.write_class(0, np.zeros((1, 8), np.float32), [_png(0)], 0.0)
    with pytest.raises(RuntimeError, match="not --ipc 2"):
        assemble(out, state, {0: "a"}, 2, (2, 2, 2))
    assert not list(tmp_path.glob(".d3hr-*"))  # no scratch file left behind


def test_safetensors_bytes_load_with_the_library_and_repeat_byte_for_byte():
    import subprocess
    import sys

    from safetensors.numpy import load

    from d3hr_ray.artifacts.outputs import safetensors_bytes

    arrays = {"mean": np.arange(6, dtype=np.float32).reshape(2, 3), "count": np.array([3, 4], dtype=np.int64)}
    meta = {"z": "1", "a": json.dumps(["x", "y"]), "m": "model"}
    blob = safetensors_bytes(arrays, meta)
    got = load(blob)
    np.testing.assert_array_equal(got["mean"], arrays["mean"])
    np.testing.assert_array_equal(got["count"], arrays["count"])
    # Another process (another hash seed) writes the same bytes.
    code = (
        "import json, sys, numpy as np; from d3hr_ray.artifacts.outputs import safetensors_bytes; "
        "sys.stdout.buffer.write(safetensors_bytes({'mean': np.arange(6, dtype=np.float32).reshape(2, 3), "
        "'count': np.array([3, 4], dtype=np.int64)}, {'z': '1', 'a': json.dumps(['x', 'y']), 'm': 'model'}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        env={**__import__("os").environ, "PYTHONHASHSEED": "123"},
    ).stdout
    assert other == blob


def test_the_statistics_metadata_round_trips_and_an_early_file_reads(tmp_path):
    """stats.safetensors' metadata as strings (numbers by str(), names as JSON), read back as the record; a file
    written with fewer keys (early versions had no timestep, names or native size) reads with None for them."""
    meta = StatsMeta(model="m", steps=50, inversion_step=25, timestep=480, guidance=4.0, encode="mean", seed=0,
                     data="digits", class_names=["a", "b"], native_size=8)  # fmt: skip
    written = meta.to_meta()
    assert written["steps"] == "50" and written["guidance"] == "4.0" and written["class_names"] == '["a", "b"]'
    assert written["version"] == "2"
    out = OutputDir(str(tmp_path))
    write_stats(out, np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32), np.array([2, 3]), meta)
    tensors, back = read_stats(str(tmp_path / "stats.safetensors"))
    assert back == meta and tensors["count"].tolist() == [2, 3]
    early = StatsMeta.from_meta({"model": "m", "steps": "50", "guidance": "1.0"})
    assert early == StatsMeta(model="m", steps=50, guidance=1.0)
    with pytest.raises(ValueError, match=r"statistics file has version '3'; this d3hr_ray reads versions 1 to 2"):
        StatsMeta.from_meta({"model": "m", "version": "3"})
