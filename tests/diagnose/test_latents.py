"""diagnose/latents.py: the shuffle keeps each class's marginals; a tiny model's run scores real images as here."""

import argparse
import io

import numpy as np
import torch
from PIL import Image

from d3hr_ray.diagnose import latents
from d3hr_ray.evaluation.teacher import save_teacher
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training.students import build_student


def test_shuffle_keeps_every_class_column_and_breaks_rows():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(40, 6, generator=g), torch.tensor([0, 1] * 20)
    s = latents.shuffle_within_class(z, y, torch.Generator().manual_seed(1))
    for c in (0, 1):
        a, b = z[y == c], s[y == c]
        for d in range(6):
            assert sorted(a[:, d].tolist()) == sorted(b[:, d].tolist())  # the same values in each column
    assert not torch.equal(s, z)
    rows = {tuple(r) for r in z.tolist()}
    assert sum(tuple(r) in rows for r in s.tolist()) < 5  # rows are new combinations


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_run_on_a_tiny_model(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "model")  # 10 classes class_0..class_9, 8 px
    names, r = ["class_7", "class_2", "class_4"], 8  # the teacher's own order, a subset of the model's classes
    torch.manual_seed(0)
    net = build_student("conv3", 3, r)
    mean, std = [0.5] * 3, [0.25] * 3
    save_teacher(
        OutputDir(str(tmp_path / "teacher")),
        net,
        {"arch": "conv3", "num_classes": 3, "resolution": r, "mean": mean, "std": std, "class_names": names},
    )
    rng = np.random.default_rng(0)
    images = {c: [rng.integers(0, 256, (r, r, 3)) for _ in range(3)] for c in names}
    for c in names:
        (tmp_path / "real" / c).mkdir(parents=True)
        for k, img in enumerate(images[c]):
            (tmp_path / "real" / c / f"{k}.png").write_bytes(_png(img))
    p = argparse.ArgumentParser()
    latents.add_arguments(p)
    args = p.parse_args(
        [
            "--model",
            str(tmp_path / "model"),
            "--teacher",
            str(tmp_path / "teacher"),
            "--data",
            str(tmp_path / "real"),
            "--test",
            str(tmp_path / "real"),
            "--per-class",
            "3",
            "--steps",
            "6",
            "--inversion-step",
            "3",
        ]
    )
    assert latents.run(args) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| set")]
    assert [row.split("|")[1].strip() for row in table] == [
        "real",
        "round trip (own z_K sampled back)",
        "diagonal Gaussian, std x 1",
        "diagonal Gaussian, std x 0.5",
        "shuffled z_K (marginals kept)",
        "N(0, I) at K",
    ]
    # The real row, computed here: every image, classes in listing order (sorted folder names).
    chosen = [(c, images[c][k]) for c in sorted(names) for k in range(3)]
    x = torch.tensor(np.stack([img for _, img in chosen]), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    x = (x - 0.5) / 0.25
    with torch.no_grad():
        pred = net.eval()(x).argmax(1).tolist()
    fidelity = sum(p == names.index(c) for p, (c, _) in zip(pred, chosen, strict=True)) / len(chosen)
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert float(cells[1]) == round(fidelity, 3)
    assert float(cells[4]) == 0.0  # the test split is these images' folder: the real row covers its own images
