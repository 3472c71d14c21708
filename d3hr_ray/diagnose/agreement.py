"""Does a trained model know its classes? Label agreement of a real-data classifier on its samples.

Generates --per-class samples per class (plain class-conditional DDIM + CFG from noise, not D3HR),
classifies them with a classifier trained on the real images, and reports how often the classifier
names the class the sample was generated for. Also writes a grid (a row per class).

- digits (default judge): logistic regression on scikit-learn's 8x8 digits (80% train split; its
  own held-out accuracy is printed for scale); samples are turned to 8x8 grey levels 0..16 like the data.
- --classifier <teacher folder>: any classifier written by `train_teacher` (e.g. conv3 on the real
  CIFAR-10 train split); samples are resized to its resolution and normalised as it was trained,
  and classes are matched by name (the model's id2label against the teacher's class names).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torchvision.utils import save_image

from d3hr_ray.evaluation.teacher import load_teacher
from d3hr_ray.models.loading import class_names, load_pipeline
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.encode import decode
from d3hr_ray.stages.generate import sample_from_noise
from d3hr_ray.training.protocol import normalize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:digits", help="pipeline to sample from")
    p.add_argument("--data", default="digits", choices=["digits"], help="the built-in judge (without --classifier)")
    p.add_argument(
        "--classifier", default=None, help="a train_teacher folder (local or s3://) to judge the samples instead"
    )
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG grid (10 samples per class) here")


def _digits_classifier(seed: int) -> tuple[LogisticRegression, float]:
    """A logistic regression on scikit-learn's 8x8 digits, and its held-out accuracy."""
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=seed, stratify=d.target)
    clf = LogisticRegression(max_iter=5000).fit(xtr, ytr)
    return clf, float(clf.score(xte, yte))


def _to_digits_features(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, 64) grey levels 0..16 at 8x8, as scikit-learn's digits are stored."""
    grey = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    small = torch.nn.functional.interpolate(grey, size=(8, 8), mode="area")  # (B, 1, 8, 8)
    return (small.flatten(1) * 16.0).clamp(0, 16).numpy()


def _teacher_judge(uri: str, model_names: list[str] | None) -> tuple[Callable[[torch.Tensor], np.ndarray], str]:
    """(images (B, 3, H, W) in [0, 1] -> (B,) predicted model class ids, description) from a teacher folder."""
    teacher, meta = load_teacher(uri)
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    if model_names and set(names) <= set(model_names):
        to_model = np.array([model_names.index(n) for n in names])
    else:
        to_model = np.arange(len(names))
    r = meta["resolution"]

    @torch.no_grad()
    def judge(images: torch.Tensor) -> np.ndarray:
        x = torch.nn.functional.interpolate(
            images.float(), size=(r, r), mode="bilinear", antialias=True, align_corners=False
        )
        return to_model[teacher(normalize(x.clamp(0, 1), meta["mean"], meta["std"])).argmax(1).numpy()]

    acc = meta.get("test_top1")
    return judge, f"{meta['arch']} teacher {uri}" + (f": real test accuracy {acc:.3f}" if acc is not None else "")


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model)
    spec = ModelSpec.from_pipeline(pipe)
    if args.classifier:
        judge, about = _teacher_judge(args.classifier, class_names(pipe))
    else:
        clf, held_out = _digits_classifier(args.seed)

        def judge(images: torch.Tensor, clf: LogisticRegression = clf) -> np.ndarray:
            return clf.predict(_to_digits_features(images))

        about = f"logistic regression, 8x8 digits: held-out accuracy {held_out:.3f}"
    g = torch.Generator().manual_seed(args.seed)
    t = time.perf_counter()
    per_class, grid_rows = [], []
    for c in range(spec.num_classes):
        labels = torch.full((args.per_class,), c)
        images = decode(pipe, sample_from_noise(pipe, labels, steps=args.steps, guidance=args.guidance, generator=g))
        pred = judge(images)
        per_class.append(float((pred == c).mean()))
        grid_rows.append(images[:10])
    secs = time.perf_counter() - t
    print(
        f"# label agreement: model={args.model}, {args.per_class} samples per class, steps={args.steps}, "
        f"w={args.guidance}"
    )
    print(f"real-data classifier ({about})")
    print("| class | " + " | ".join(str(c) for c in range(spec.num_classes)) + " | all |")
    print("|---" * (spec.num_classes + 2) + "|")
    print("| agreement | " + " | ".join(f"{a:.2f}" for a in per_class) + f" | {np.mean(per_class):.3f} |")
    print(f"({spec.num_classes * args.per_class} samples in {secs:.1f} s)")
    if args.grid:
        save_image(torch.cat(grid_rows).float(), args.grid, nrow=10, padding=1)
        print(f"grid: {args.grid}")
    return 0
