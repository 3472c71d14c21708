"""`python -m d3hr_ray.demo`: the D3HR stages in one process on scikit-learn's digits.

Runs encode -> invert -> ClassStats -> select_group -> sample -> decode with the core functions
only (no Ray), on a random-weight tiny DiT (the trained digits model arrives with the [models]
work), and writes `stats.safetensors` and `grid.png` to `--output`. It shows the library working end
to end; images from random weights are noise, not digits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from d3hr_ray import ClassStats, ModelSpec, build_pipeline, decode, derive_seed, encode, invert, sample, select_group


def digits_tensor(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 3, R, R) float32 in [-1, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.repeat(1, 3, 1, 1) * 2 - 1).clamp(-1, 1), torch.from_numpy(d.target).long()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m d3hr_ray.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="d3hr-output", help="output folder (default: ./d3hr-output)")
    p.add_argument("--ipc", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--candidates", type=int, default=20_000, help="candidate groups per class (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(dit="tiny", vae="tiny", num_classes=10, class_names=[str(i) for i in range(10)], seed=args.seed)
    spec = ModelSpec.from_pipeline(pipe)
    x, y = digits_tensor(spec.resolution)
    times = {}

    t = time.perf_counter()
    stats = ClassStats(spec.num_classes, spec.latent_dim, class_names=[str(i) for i in range(10)])
    for i in range(0, len(x), 256):
        z0 = encode(pipe, x[i : i + 256], mode="mean")  # (B, c, h, w)
        zk = invert(pipe, z0, y[i : i + 256])  # (B, c, h, w) at tau_30
        stats.update(zk.flatten(1), y[i : i + 256])
    times["encode+invert+stats"] = (len(x), time.perf_counter() - t)
    stats.save(out / "stats.safetensors")

    t = time.perf_counter()
    mean, std = stats.mean.float(), stats.var.sqrt().float()
    groups = [
        select_group(mean[c], std[c], ipc=args.ipc, candidates=args.candidates, seed=derive_seed(args.seed, "select", c))[0]
        for c in range(spec.num_classes)
    ]
    times["select"] = (spec.num_classes * args.candidates, time.perf_counter() - t)

    t = time.perf_counter()
    zK = torch.cat(groups).view(-1, *spec.latent_shape)  # (C * ipc, c, h, w)
    labels = torch.arange(spec.num_classes).repeat_interleave(args.ipc)
    images = decode(pipe, sample(pipe, zK, labels))  # (C * ipc, 3, R, R) in [0, 1]
    times["generate"] = (len(images), time.perf_counter() - t)

    from torchvision.utils import save_image

    save_image(images, out / "grid.png", nrow=args.ipc)
    print(f"{'stage':<22}{'items':>10}{'seconds':>10}{'items/s':>12}")
    for stage, (n, s) in times.items():
        print(f"{stage:<22}{n:>10}{s:>10.2f}{n / s:>12.1f}")
    print(f"wrote {out / 'stats.safetensors'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
