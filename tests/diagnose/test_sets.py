"""bench/sets.py: the four numbers against loops written here, and a run on files of every kind it reads."""

import io
import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from d3hr_ray.artifacts.outputs import _hf_metadata
from d3hr_ray.diagnose import sets
from d3hr_ray.evaluation.teacher import save_teacher
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training.students import build_student


def test_set_metrics_against_loops():
    g = torch.Generator().manual_seed(0)
    feats, logits = torch.randn(9, 5, generator=g), torch.randn(9, 3, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    test_feats, test_labels = torch.randn(7, 5, generator=g), torch.tensor([0, 1, 2, 2, 1, 0, 0])
    m = sets.set_metrics(feats, logits, labels, test_feats, test_labels)

    f, lo, y = feats.numpy().astype(float), logits.numpy().astype(float), labels.tolist()
    assert m["fidelity"] == sum(int(np.argmax(lo[i]) == y[i]) for i in range(9)) / 9
    conf = [max(math.exp(v) for v in row) / sum(math.exp(v) for v in row) for row in lo]
    assert math.isclose(m["confidence"], sum(conf) / 9, rel_tol=1e-12)
    unit = [row / math.sqrt(sum(v * v for v in row)) for row in f]
    per_class = []
    for c in (0, 1, 2):
        idx = [i for i in range(9) if y[i] == c]
        pairs = [math.dist(unit[a], unit[b]) for a, b in itertools.permutations(idx, 2)]
        per_class.append(sum(pairs) / len(pairs))
    assert math.isclose(m["diversity"], sum(per_class) / 3, rel_tol=1e-12)
    tf = test_feats.numpy().astype(float)
    gaps = []
    for j, c in enumerate(test_labels.tolist()):
        t = tf[j] / math.sqrt(sum(v * v for v in tf[j]))
        gaps.append(1 - max(float(np.dot(t, unit[i])) for i in range(9) if y[i] == c))
    assert math.isclose(m["coverage_gap"], sum(gaps) / 7, rel_tol=1e-12)


def test_one_image_per_class_has_no_diversity_and_a_missing_class_has_gap_one():
    m = sets.set_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.eye(3)[:, :2], torch.tensor([0, 1, 2]))
    assert math.isnan(m["diversity"])
    assert math.isclose(m["coverage_gap"], (0 + 0 + 1) / 3)  # class 2 (a zero test feature) is absent from the set


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_run_reads_a_distilled_parquet_an_imagefolder_and_matches_classes_by_name(tmp_path, capsys):
    names, r = ["ant", "bee", "cat"], 8
    torch.manual_seed(0)
    net = build_student("conv3", 3, r)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    save_teacher(
        OutputDir(str(tmp_path / "teacher")),
        net,
        {"arch": "conv3", "num_classes": 3, "resolution": r, "mean": mean, "std": std, "class_names": names},
    )
    rng = np.random.default_rng(0)
    pixels = {c: [rng.integers(0, 256, (r, r, 3)) for _ in range(4)] for c in names}  # (R, R, 3) uint8 each
    for c in names:
        (tmp_path / "real" / c).mkdir(parents=True)
        for k, img in enumerate(pixels[c]):
            (tmp_path / "real" / c / f"{k}.png").write_bytes(_png(img))
    # A distilled set whose own class order is reversed (cat = 0), holding every real image.
    own = names[::-1]
    rows = [(c, img) for c in own for img in pixels[c]]
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
            ("class", pa.string()),
        ],
        metadata={b"huggingface": _hf_metadata(dict(enumerate(own)))},
    )
    table = pa.table(
        {
            "image": [{"bytes": _png(img), "path": None} for _, img in rows],
            "label": [own.index(c) for c, _ in rows],
            "class": [c for c, _ in rows],
        },
        schema=schema,
    )
    (tmp_path / "set").mkdir()
    pq.write_table(table, tmp_path / "set" / "distilled.parquet")

    args = _parse(
        [
            "--teacher",
            str(tmp_path / "teacher"),
            "--set",
            f"mine={tmp_path / 'set'}",
            "--real",
            str(tmp_path / "real"),
            "--real-ipc",
            "4",
            "--real-seeds",
            "3",
            "--test",
            str(tmp_path / "real"),
        ]
    )
    assert sets.run(args) == 0
    out = capsys.readouterr().out
    mine = next(line for line in out.splitlines() if line.startswith("| mine |"))
    real = next(line for line in out.splitlines() if line.startswith("| random real, seed 3 |"))

    # Fidelity of the set, computed here: the teacher's argmax against the names' ids in the teacher's order.
    x = torch.tensor(np.stack([img for _, img in rows]), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = net.eval()(x).argmax(1).tolist()
    fidelity = sum(p == names.index(c) for p, (c, _) in zip(pred, rows, strict=True)) / len(rows)
    cells = [c.strip() for c in mine.strip("|").split("|")]
    assert cells[1] == "12" and float(cells[2]) == round(fidelity, 3)
    assert float(cells[5]) == 0.0  # every test image is in the set, under its own class: matched by name, not id
    # The random real subset with IPC 4 is every real image, and the test split is those images: no gap.
    cells = [c.strip() for c in real.strip("|").split("|")]
    assert cells[1] == "12" and float(cells[5]) == 0.0

    # A keys file as evaluate writes it for a baseline: the images it names, read from its source.
    import json

    from d3hr_ray.data.sources import list_source

    shard_of = {
        s.label: s.id for s in list_source(str(tmp_path / "real"), model_names=names, num_model_classes=3).shards
    }
    keys = {c: [[f"{c}/{k}.png", shard_of[names.index(c)]] for k in (0, 2)] for c in names}
    (tmp_path / "keys.json").write_text(
        json.dumps({"baseline": "herding", "source": str(tmp_path / "real"), "keys": keys})
    )
    pixels_k, labels_k = sets._pixels_of_keys(str(tmp_path / "keys.json"), names, r)
    found = []
    for img, y in zip(pixels_k, labels_k.tolist(), strict=True):
        found += [(y, k) for k in (0, 2) if np.array_equal(img.transpose(1, 2, 0), pixels[names[y]][k])]
    assert sorted(found) == sorted((names.index(c), k) for c in names for k in (0, 2))


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    sets.add_arguments(p)
    return p.parse_args(argv)


def test_set_labels_may_hold_an_equals_sign(tmp_path):
    (tmp_path / "k20").mkdir()
    assert sets.label_and_uri(f"K = 20={tmp_path / 'k20'}") == ("K = 20", str(tmp_path / "k20"))
    assert sets.label_and_uri("D3HR=s3://bucket/date=2024/set") == ("D3HR", "s3://bucket/date=2024/set")
    assert sets.label_and_uri("a=relative/dir") == ("a", "relative/dir")
    for bad in ("no-equals", "=x", "x="):
        with pytest.raises(SystemExit):
            sets.label_and_uri(bad)
