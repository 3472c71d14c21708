"""card.py: the output folder loads with `datasets.load_dataset(<folder>)` (offline) as exactly distilled.parquet's
rows and names, the card parses with huggingface_hub's DatasetCard, hostile class names survive YAML and Markdown."""

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from d3hr_ray.artifacts.card import card_text, write_card
from d3hr_ray.artifacts.outputs import OUTPUTS, assemble
from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.storage.fs import OutputDir
from tests.cifar_slice import CLASSES, needs_cifar

# Names that break naive YAML or Markdown: a document marker alone and inside lines, quotes, a colon, a leading
# dash, YAML tags and anchors, HTML, a table's '|', unicode, a name that reads as a number or a boolean.
HOSTILE = {
    0: "---",
    1: 'say "hi": it\'s',
    2: "- [x] #tag {a: b} &anchor *ref !!python/object",
    3: "line one\n---\nline three",
    5: "<img src=x onerror=alert(1)>|cell|",
    6: "ü ñ 日本語 🐟",
    7: "007",
    8: "yes",
    9: "back`tick`s",
}


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(names: dict[int, str], ipc: int, **config) -> dict:
    return {
        "status": "complete",
        "reasons": [],
        "undistilled": {},
        "config": {"data": "s3://b/train", "model": "facebook/DiT-XL-2-256", "ipc": ipc, "seed": 3, **config},
        "class_ids": sorted(names),
        "class_names": [names[c] for c in sorted(names)],
        "counts": {n: {"read": 10 + c, "used": 9 + c, "skipped": 1} for c, n in names.items()},
        "scores": {n: 0.25 * c for c, n in names.items()},
        "versions": {"d3hr_ray": "0.1", "ray": "2"},
    }


def _distilled_output(root, names: dict[int, str], ipc: int = 2, **config) -> dict:
    """A distill output as the job leaves it: class states, assembled files, a stray grid and images (which
    load_dataset must not pick up), the card."""
    out = OutputDir(str(root))
    state = RunState(out)
    for c in names:
        state.write_class(c, np.zeros((ipc, 8), np.float32), [_png(10 * c + k) for k in range(ipc)], float(c))
    assemble(out, state, names, ipc, (2, 2, 2))
    out.write_bytes("images/extra/0.png", _png(1))
    out.write_bytes("report/thumbs/x.webp", b"not an image")
    manifest = _manifest(names, ipc, **config)
    write_card(out, Manifest.from_json(manifest))
    return manifest


def _load(folder, tmp_path, monkeypatch):
    """`datasets.load_dataset(folder)`, offline, caching under tmp_path."""
    import datasets

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)  # read at import: set it too
    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))


def test_the_folder_loads_as_exactly_the_parquet_rows_with_their_names(tmp_path, monkeypatch):
    import datasets

    _distilled_output(tmp_path / "out", HOSTILE)
    loaded = _load(tmp_path / "out", tmp_path, monkeypatch)
    assert list(loaded) == ["train"]
    ds = loaded["train"].cast_column("image", datasets.Image(decode=False))
    table = pq.read_table(tmp_path / "out" / "distilled.parquet")
    assert ds.num_rows == table.num_rows == 2 * len(HOSTILE)
    assert ds["label"] == table.column("label").to_pylist() == [c for c in sorted(HOSTILE) for _ in range(2)]
    assert ds["class"] == table.column("class").to_pylist()
    assert [r["bytes"] for r in ds["image"]] == [r["bytes"] for r in table.column("image").to_pylist()]
    # The names: every label id up to the largest, a missing id (4) named by itself, the others as given.
    want = [HOSTILE.get(i, str(i)) for i in range(max(HOSTILE) + 1)]
    assert ds.features["label"].names == want
    stored = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    assert stored == want
    assert isinstance(ds.features["image"], datasets.Image) and ds.features["class"].dtype == "string"


def test_the_card_parses_with_huggingface_hub(tmp_path):
    from huggingface_hub import DatasetCard

    names = {0: "a", 2: "b: c"}
    _distilled_output(tmp_path, names, license="cc-by-nc-4.0")
    card = DatasetCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-nc-4.0"
    assert data["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "distilled.parquet"}]}
    ]
    features = {f["name"]: f["dtype"] for f in data["dataset_info"]["features"]}
    assert features["label"] == {"class_label": {"names": {"0": "a", "1": "1", "2": "b: c"}}}
    assert features["image"] == "image" and features["class"] == "string"
    assert "dataset-distillation" in data["tags"] and data["size_categories"] == ["n<1K"]
    assert card.text.lstrip().startswith("# D3HR distilled set")
    # The default license when the flag is not given.
    write_card(OutputDir(str(tmp_path)), Manifest.from_json(_manifest(names, 2)))
    assert DatasetCard.load(tmp_path / "README.md").data.license == "other"


def test_hostile_names_survive_the_yaml_and_stay_text_in_the_body():
    import yaml

    text = card_text(Manifest.from_json(_manifest(HOSTILE, 2)))
    front, body = text.split("\n---\n", 1)  # the first line of '---' at column 0 after the opening one
    meta = yaml.safe_load(front.removeprefix("---\n"))
    names = meta["dataset_info"]["features"][1]["dtype"]["class_label"]["names"]
    assert names == {str(i): HOSTILE.get(i, str(i)) for i in range(10)}
    assert all(line != "---" for line in body.splitlines())  # no second front matter
    assert "<img" not in body and "&lt;img src=x onerror=alert\\(1\\)&gt;" in body
    table = [line for line in body.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(HOSTILE)
    assert all(line.count("|") - line.count("\\|") == 7 for line in table)  # six cells each: no '|' broke a row
    row = next(line for line in table if line.startswith("| 3 |"))
    assert "line one \\-\\-\\- line three" in row and "| 13 | 12 | 1 | 0.7500 |" in row  # read, used, skipped, score


@pytest.mark.parametrize(
    "status, config, says",
    [
        ("failed", {}, "holds no `distilled.parquet`"),
        ("complete", {"stats_only": True}, "holds no `distilled.parquet`"),
    ],
)
def test_a_run_without_a_parquet_says_so(status, config, says):
    m = {"status": status, "reasons": ["KeyboardInterrupt"], "config": {"ipc": 10, **config}}
    text = card_text(Manifest.from_json(m))
    assert says in text and "KeyboardInterrupt" in text and "**" + status + "**" in text
    assert "size_categories:\n- n<1K" in text and "'0'" not in text  # no rows, no names


def test_overwrite_clears_the_card_and_the_report_pages():
    assert {"README.md", "report.html", "report"} <= set(OUTPUTS)


@needs_cifar
def test_the_run_loads_with_datasets(first_run, tmp_path, monkeypatch):
    """The CIFAR slice's output folder, as a user loads it: 12 rows, its four class names, the card's settings."""
    manifest, out = first_run
    ds = _load(out, tmp_path, monkeypatch)["train"]
    assert ds.num_rows == 12 and ds.features["label"].names == CLASSES
    assert ds["class"] == [c for c in CLASSES for _ in range(3)]
    assert ds[0]["image"].size == (32, 32)
    text = (out / "README.md").read_text()
    assert f"| ipc | `{manifest['config']['ipc']}` |" in text
    for c in CLASSES:
        score = manifest["scores"][c]
        assert f"| {c} |" in text and ("n/a" if math.isnan(score) else f"{score:.4f}") in text
