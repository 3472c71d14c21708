"""diagnose/agreement.py: samples as 8x8 digits, the two judges, and the per-class agreement the table reports."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from d3hr_ray.diagnose import agreement
from d3hr_ray.diagnose.agreement import _digits_classifier, _teacher_judge, _to_digits_features
from d3hr_ray.evaluation.teacher import save_teacher
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training.students import build_student


def ref_area_8x8(grey: np.ndarray) -> np.ndarray:
    """(H, W) -> (8, 8): each output pixel the mean of the input pixels its cell overlaps (adaptive average pooling)."""
    h, w = grey.shape
    out = np.empty((8, 8))
    for i in range(8):
        for j in range(8):
            rows = slice(i * h // 8, -(-(i + 1) * h // 8))
            cols = slice(j * w // 8, -(-(j + 1) * w // 8))
            out[i, j] = grey[rows, cols].mean()
    return out


@pytest.mark.parametrize("side", [8, 16, 12, 20])
def test_digits_features_are_grey_8x8_area_means_scaled_to_16(side):
    images = torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    got = _to_digits_features(images)
    assert got.shape == (3, 64) and got.dtype == np.float32
    x = images.numpy()
    for b in range(3):
        grey = (x[b, 0] + x[b, 1] + x[b, 2]) / 3  # (H, W)
        np.testing.assert_allclose(got[b], 16 * ref_area_8x8(grey).reshape(64), rtol=1e-5, atol=1e-5)


def test_digits_features_clip_to_the_data_range():
    images = torch.full((2, 3, 8, 8), 0.5)
    images[0] = 1.5
    images[1, :, :4] = -0.2
    got = _to_digits_features(images)
    assert (got[0] == 16).all()
    assert (got[1, :32] == 0).all() and (got[1, 32:] == 8).all()  # row-major: the top four rows first


def test_digits_features_of_a_digit_image_are_the_digit():
    """scikit-learn's digits, drawn as RGB images in [0, 1] at 16 px (each cell 2x2 pixels), come back exactly."""
    d = load_digits()
    data = d.data[:50]  # (50, 64) grey levels 0..16
    cells = torch.tensor(data / 16.0, dtype=torch.float32).view(50, 1, 8, 8)
    images = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).expand(50, 3, 16, 16)  # (50, 3, 16, 16)
    np.testing.assert_allclose(_to_digits_features(images), data, atol=1e-5)


@pytest.fixture(scope="module")
def judge0():
    return _digits_classifier(0)


def test_digits_classifier_reports_its_accuracy_on_the_held_out_fifth(judge0):
    clf, held_out = judge0
    d = load_digits()
    _, xte, _, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=0, stratify=d.target)
    assert len(yte) == 360 and np.bincount(yte).min() >= 35  # a stratified fifth of 1,797
    assert held_out == float(np.mean(clf.predict(xte) == yte))
    assert 0.9 < held_out <= 1.0  # logistic regression on 8x8 digits: about 0.96
    assert clf.classes_.tolist() == list(range(10))


def test_digits_classifier_judges_samples_drawn_like_the_data(judge0):
    """The same digit through the features path (RGB, 16 px) gets the label it gets from the data itself."""
    clf, _ = judge0
    d = load_digits()
    data, target = d.data[::9], d.target[::9]  # (200, 64)
    cells = torch.tensor(data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    images = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).expand(-1, 3, 16, 16)
    via_images = clf.predict(_to_digits_features(images))
    assert (via_images == clf.predict(data)).all()
    assert np.mean(via_images == target) > 0.9


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random conv3 teacher of 3 classes at 8 px, saved with its class names and normalisation: (uri, net, meta)."""
    folder = tmp_path_factory.mktemp("agreement") / "teacher"
    torch.manual_seed(1)
    net = build_student("conv3", 3, 8).eval()
    with torch.no_grad():  # centre the logits on random images, so that the teacher's answers vary with the image
        calibration = torch.rand(256, 3, 8, 8, generator=torch.Generator().manual_seed(9))  # (256, 3, 8, 8)
        net.classifier.bias.copy_(-net.classifier.weight @ net.features(calibration).flatten(1).mean(0))
    meta = {
        "arch": "conv3",
        "num_classes": 3,
        "resolution": 8,
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.25, 0.3],
        "class_names": ["cat", "dog", "bird"],
    }
    save_teacher(OutputDir(str(folder)), net, meta)
    return str(folder), net, meta


@torch.no_grad()
def _teacher_says(net, meta, x8: torch.Tensor) -> np.ndarray:
    """The teacher's class (its own ids) for (B, 3, 8, 8) images in [0, 1]: normalised by hand."""
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return net((x8 - mean) / std).argmax(1).numpy()


def test_teacher_judge_maps_the_teachers_classes_to_the_models_by_name(teacher):
    uri, net, meta = teacher
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.3  # some out of [0, 1]
    theirs = _teacher_says(net, meta, images.clamp(0, 1))
    assert len(set(theirs.tolist())) > 1  # the check below can tell the classes apart
    judge, about = _teacher_judge(uri, ["frog", "bird", "cat", "dog"])
    to_model = {0: 2, 1: 3, 2: 1}  # cat, dog, bird in the model's id2label
    assert judge(images).tolist() == [to_model[c] for c in theirs.tolist()]
    assert about == f"conv3 teacher {uri}"
    # Names the model does not hold: the teacher's ids are taken as the model's.
    judge, _ = _teacher_judge(uri, ["a", "b", "c"])
    assert judge(images).tolist() == theirs.tolist()
    judge, _ = _teacher_judge(uri, None)
    assert judge(images).tolist() == theirs.tolist()


def test_teacher_judge_resizes_to_the_teachers_resolution(teacher):
    """16 px samples are judged as their 8 px selves, resized as PIL's antialiased bilinear resize does."""
    uri, net, meta = teacher
    images = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # (64, 3, 16, 16)
    small = [
        [np.asarray(Image.fromarray(img[c].numpy(), mode="F").resize((8, 8), Image.BILINEAR)) for c in range(3)]
        for img in images
    ]
    theirs = _teacher_says(net, meta, torch.tensor(np.array(small)).clamp(0, 1))  # (64, 3, 8, 8) in
    assert len(set(theirs.tolist())) > 1
    judge, _ = _teacher_judge(uri, None)
    assert judge(images).tolist() == theirs.tolist()


def test_teacher_judge_without_names_reports_the_teachers_accuracy(tmp_path):
    torch.manual_seed(0)
    meta = {"arch": "conv3", "num_classes": 2, "resolution": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "test_top1": 0.875}
    save_teacher(OutputDir(str(tmp_path / "t")), build_student("conv3", 2, 8), meta)
    judge, about = _teacher_judge(str(tmp_path / "t"), ["0", "1"])
    assert about == f"conv3 teacher {tmp_path / 't'}: real test accuracy 0.875"
    assert set(judge(torch.rand(16, 3, 8, 8)).tolist()) <= {0, 1}


def test_run_reports_each_classs_share_of_samples_judged_as_it(tiny_pipe, monkeypatch, tmp_path, capsys):
    """Class c's agreement is the fraction of its samples the judge names c; 'all' is their mean."""
    calls = []

    class Judge:
        """Names the class being sampled (calls come one class at a time) for the first c of its samples."""

        def predict(self, features):
            c = len(calls)
            calls.append(features)
            return np.array([c] * c + [(c + 1) % 10] * (len(features) - c))

    monkeypatch.setattr(agreement, "_digits_classifier", lambda seed: (Judge(), 0.5))
    monkeypatch.setattr(agreement, "load_pipeline", lambda uri: tiny_pipe)
    p = argparse.ArgumentParser()
    agreement.add_arguments(p)
    grid = tmp_path / "grid.png"
    args = p.parse_args(["--model", "tiny", "--per-class", "10", "--steps", "2", "--grid", str(grid)])
    assert agreement.run(args) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| agreement |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert cells == [f"{c / 10:.2f}" for c in range(10)] + [f"{np.mean([c / 10 for c in range(10)]):.3f}"]
    assert "held-out accuracy 0.500" in out and "(100 samples in" in out
    assert len(calls) == 10 and all(f.shape == (10, 64) and f.min() >= 0 and f.max() <= 16 for f in calls)
    # The grid: 10 samples of each class, a row per class, 1 px padding around 8 px images.
    assert Image.open(grid).size == (10 * 9 + 1, 10 * 9 + 1)
