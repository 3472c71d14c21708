"""Does a trained model know its classes? Label agreement of a real-data classifier on its samples.

Generates --per-class samples per class (plain class-conditional DDIM + CFG from noise, not D3HR),
classifies them with a classifier trained on the real images, and reports how often the classifier
names the class the sample was generated for. Also writes a grid (a row per class).

- digits: logistic regression on scikit-learn's 8x8 digits (80% train split; its own held-out
  accuracy is printed for scale); samples are turned to 8x8 grey levels 0..16 like the data.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:digits", help="pipeline to sample from")
    p.add_argument("--data", default="digits", choices=["digits"], help="whose real-data classifier judges the samples")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG grid (10 samples per class) here")


def _digits_classifier(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.2, random_state=seed, stratify=d.target)
    clf = LogisticRegression(max_iter=5000).fit(xtr, ytr)
    return clf, float(clf.score(xte, yte))


def _to_digits_features(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, 64) grey levels 0..16 at 8x8, as scikit-learn's digits are stored."""
    grey = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    small = torch.nn.functional.interpolate(grey, size=(8, 8), mode="area")  # (B, 1, 8, 8)
    return (small.flatten(1) * 16.0).clamp(0, 16).numpy()


def run(args) -> int:
    from d3hr_ray import ModelSpec, decode, load_pipeline
    from d3hr_ray.stages.generate import sample_from_noise

    pipe = load_pipeline(args.model)
    spec = ModelSpec.from_pipeline(pipe)
    clf, held_out = _digits_classifier(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t = time.perf_counter()
    per_class, grid_rows = [], []
    for c in range(spec.num_classes):
        labels = torch.full((args.per_class,), c)
        images = decode(pipe, sample_from_noise(pipe, labels, steps=args.steps, guidance=args.guidance, generator=g))
        pred = clf.predict(_to_digits_features(images))
        per_class.append(float((pred == c).mean()))
        grid_rows.append(images[:10])
    secs = time.perf_counter() - t
    print(f"# label agreement: model={args.model}, {args.per_class} samples per class, steps={args.steps}, w={args.guidance}")
    print(f"real-data classifier (logistic regression, 8x8 digits): held-out accuracy {held_out:.3f}")
    print("| class | " + " | ".join(str(c) for c in range(spec.num_classes)) + " | all |")
    print("|---" * (spec.num_classes + 2) + "|")
    print("| agreement | " + " | ".join(f"{a:.2f}" for a in per_class) + f" | {np.mean(per_class):.3f} |")
    print(f"({spec.num_classes * args.per_class} samples in {secs:.1f} s)")
    if args.grid:
        from torchvision.utils import save_image

        save_image(torch.cat(grid_rows).float(), args.grid, nrow=10, padding=1)
        print(f"grid: {args.grid}")
    return 0
