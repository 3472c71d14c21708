"""Where a class is lost between z_K and the image: D3HR's latent model checked through a teacher.

Takes --per-class real images per class of --data, encodes them (VAE mean), inverts them to K, and
decodes six sets of the same size, each scored by `diagnose sets`' four numbers (fidelity, confidence,
diversity, coverage gap against --test):

- real: the images themselves;
- round trip: each image's own z_K sampled back to 0 (tests the inversion and the generator);
- diagonal Gaussian: per-class mean and variance of these z_K, one independent draw per image
  (D3HR's class model, without group selection), and the same with the spread halved;
- shuffled z_K: each latent dimension permuted among the images of its class, which keeps every
  marginal exactly and breaks only the dependence between dimensions;
- N(0, I) at K: the noise ablation.

If the round trip keeps fidelity and the diagonal Gaussian loses it, the loss is in the class model,
not in the inversion or the generator; if shuffling loses as much, it is the independence of the
dimensions.

    python -m d3hr_ray.diagnose latents --model out/model --teacher out/teacher --data train.parquet \\
        --test test.parquet --per-class 10 --inversion-step 30 --guidance 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from d3hr_ray.diagnose.sets import features_and_logits, rows_of_source, set_metrics, stack_pixels, test_features
from d3hr_ray.evaluation.teacher import load_teacher
from d3hr_ray.models.loading import class_names, load_pipeline
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.encode import decode, encode
from d3hr_ray.stages.generate import sample
from d3hr_ray.stages.invert import invert
from d3hr_ray.training.protocol import normalize

__all__ = ["shuffle_within_class"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the pipeline (folder, s3://, builtin:digits)")
    p.add_argument("--teacher", required=True, help="a train_teacher folder (local or s3://)")
    p.add_argument("--data", required=True, help="real images (any --data form); the first --per-class of each class")
    p.add_argument("--test", default=None, help="the real test split, for the coverage gap")
    p.add_argument("--test-limit", type=int, default=2000, help="test images used (listing order)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inversion-step", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0, help="w, for the inversion and the sampling")
    p.add_argument("--seed", type=int, default=0)


def shuffle_within_class(z: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, D) latents, (N,) labels -> (N, D): every column permuted independently among the rows of each class.

    Each class keeps exactly its per-dimension marginals (the same multiset of values per column);
    which values share a row is random.
    """
    out = z.clone()
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        for d in range(z.shape[1]):
            out[rows, d] = z[rows[torch.randperm(len(rows), generator=generator)], d]
    return out


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model)
    spec = ModelSpec.from_pipeline(pipe)
    model_names = class_names(pipe)
    if model_names is None:
        raise SystemExit(f"--model {args.model} names no classes: the teacher's classes cannot be matched to it")
    teacher, meta = load_teacher(args.teacher)
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    missing = sorted(set(names) - set(model_names))
    if missing:
        raise SystemExit(f"the teacher's classes {missing} are not the model's")
    to_model = torch.tensor([model_names.index(n) for n in names])

    items, labels = rows_of_source(args.data, names, per_class=args.per_class)  # the first per_class of each class
    order = np.argsort(labels, kind="stable")  # grouped by teacher class id, listing order within a class
    x = torch.from_numpy(stack_pixels([items[i] for i in order], spec.resolution)).float() / 127.5 - 1.0  # (N, 3, R, R)
    y = torch.from_numpy(labels[order])  # (N,) teacher ids
    ym = to_model[y]  # (N,) model ids
    tf = tl = None
    if args.test:
        tf, _, tl = test_features(teacher, meta, args.test, args.test_limit)

    def score(images01: torch.Tensor) -> dict:
        r = meta["resolution"]
        v = torch.nn.functional.interpolate(
            images01.float().clamp(0, 1), size=(r, r), mode="bilinear", antialias=True, align_corners=False
        )
        f, lo = features_and_logits(teacher, normalize(v, meta["mean"], meta["std"]))
        return set_metrics(f, lo, y, tf, tl)

    k, w, g = args.inversion_step, args.guidance, torch.Generator().manual_seed(args.seed)

    def generate(z: torch.Tensor) -> torch.Tensor:
        return decode(pipe, sample(pipe, z, ym, steps=args.steps, start_step=k, guidance=w))

    rows = [("real", (x + 1) / 2)]
    with torch.no_grad():
        zk = invert(
            pipe, encode(pipe, x, mode="mean"), ym, steps=args.steps, inversion_step=k, guidance=w
        )  # (N, c, h, w)
        rows.append(("round trip (own z_K sampled back)", generate(zk)))
        flat = zk.flatten(1)  # (N, D)
        classes = torch.unique(y)
        mu = torch.zeros(int(y.max()) + 1, flat.shape[1])
        sd = torch.zeros_like(mu)
        for c in classes.tolist():
            mu[c], sd[c] = flat[y == c].mean(0), flat[y == c].std(0)
        for scale in (1.0, 0.5):
            eps = torch.randn(flat.shape, generator=g)
            rows.append((f"diagonal Gaussian, std x {scale:g}", generate((mu[y] + scale * sd[y] * eps).view_as(zk))))
        rows.append(("shuffled z_K (marginals kept)", generate(shuffle_within_class(flat, y, g).view_as(zk))))
        rows.append(("N(0, I) at K", generate(torch.randn(zk.shape, generator=g))))

    print(
        f"# latents through the teacher: model={args.model}, K={k} of {args.steps}, w={w}, {len(y)} images "
        f"({args.per_class} per class), teacher {meta['arch']}"
    )
    print("| set | fidelity | confidence | diversity | coverage gap |")
    print("|---|---|---|---|---|")
    for label, images in rows:
        m = score(images)
        print(
            f"| {label} | {m['fidelity']:.3f} | {m['confidence']:.3f} | {m['diversity']:.3f} | "
            f"{m['coverage_gap']:.3f} |",
            flush=True,
        )
    return 0
