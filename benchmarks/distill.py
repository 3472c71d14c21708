"""The distillation job: images/s for encode+invert and for generation, Ray job vs one process.

Runs the same work twice on the same inputs: once as `python -m d3hr_ray.distill` would (Ray Data,
actor pools, partial statistics, writing every output), once in this process with the core functions
only (no Ray, no output files), so Ray's overhead is visible. Inputs: the built-in digits or a local
ImageFolder (--data).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import ray
import torch

from d3hr_ray import ClassStats, ModelSpec, decode, derive_seed, encode, invert, load_pipeline, sample, select_group
from d3hr_ray.config import DistillConfig
from d3hr_ray.data.digits import digits_rgb
from d3hr_ray.data.preprocess import to_model_input
from d3hr_ray.distill import run as run_job
from d3hr_ray.models.build import build_pipeline
from d3hr_ray.models.loading import class_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="digits or a local ImageFolder root")
    p.add_argument("--model", default=None, help="model source (default: builtin:digits)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--candidates", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inversion-step", type=int, default=30)
    p.add_argument("--max-actors", type=int, default=None)
    p.add_argument("--skip-ray", action="store_true", help="only the in-process numbers")
    p.add_argument(
        "--random-model",
        default=None,
        metavar="DIT,VAE,RES",
        help="build a random-weight model instead of --model, e.g. 'S/2,small,32' (DiT-S/2, the small VAE, "
        "32 px; class names from the --data folders): compute-bound work with the real code paths",
    )
    p.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="use only the first N images (sorted) of each --data class folder (symlinked, read in place)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the one-process run (default: all cores)"
    )


def _inputs(data: str, names: list[str] | None, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 3, R, R) float32 in [-1, 1], y (N,) int64) without Ray."""
    if data == "digits":
        rgb, target = digits_rgb()
        items = [(rgb[i], int(target[i])) for i in range(len(rgb))]
    else:
        root = Path(data)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        ids = {n: (names.index(n) if names and n in names else i) for i, n in enumerate(classes)}
        items = [(f.read_bytes(), ids[c]) for c in classes for f in sorted((root / c).iterdir()) if f.is_file()]
    x = torch.from_numpy(np.stack([to_model_input(it, resolution) for it, _ in items]))
    return x, torch.tensor([y for _, y in items], dtype=torch.int64)


def _in_process(args: argparse.Namespace, model: str) -> tuple[int, float, int, float]:
    pipe = load_pipeline(model)
    spec = ModelSpec.from_pipeline(pipe)
    names = class_names(pipe)
    x, y = _inputs(args.data, names, spec.resolution)
    t = time.perf_counter()
    stats = ClassStats(spec.num_classes, spec.latent_dim)
    for i in range(0, len(x), args.batch_size):
        zk = invert(
            pipe,
            encode(pipe, x[i : i + args.batch_size], mode="mean"),
            y[i : i + args.batch_size],
            steps=args.steps,
            inversion_step=args.inversion_step,
        )
        stats.update(zk.flatten(1), y[i : i + args.batch_size])
    t_enc = time.perf_counter() - t
    classes = sorted(int(c) for c in torch.unique(y))
    mean, std = stats.mean.float(), stats.var.sqrt().float()
    t = time.perf_counter()
    for c in classes:
        group, _ = select_group(
            mean[c], std[c], ipc=args.ipc, candidates=args.candidates, seed=derive_seed(0, "select", c)
        )
        z = sample(
            pipe,
            group.view(args.ipc, *spec.latent_shape),
            torch.full((args.ipc,), c),
            steps=args.steps,
            start_step=args.inversion_step,
        )
        decode(pipe, z)
    t_gen = time.perf_counter() - t
    return len(x), t_enc, len(classes) * args.ipc, t_gen


def _subset(data: str, per_class: int, root: Path) -> str:
    """An ImageFolder of symlinks to the first `per_class` files of each class folder of `data`."""
    for c in sorted(p for p in Path(data).iterdir() if p.is_dir()):
        (root / c.name).mkdir(parents=True)
        for f in sorted(f for f in c.iterdir() if f.is_file())[:per_class]:
            (root / c.name / f.name).symlink_to(f.resolve())
    return str(root)


def _random_model(spec: str, data: str, root: Path) -> str:
    """'DIT,VAE,RES' -> a saved random-weight pipeline whose classes are the --data class folders."""
    dit, vae, res = spec.split(",")
    names = sorted(p.name for p in Path(data).iterdir() if p.is_dir())
    build_pipeline(dit=dit, vae=vae, resolution=int(res), num_classes=len(names), class_names=names).save_pretrained(
        root
    )
    return str(root)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if args.per_class is not None:
            args.data = _subset(args.data, args.per_class, Path(tmp) / "data")
        if args.random_model is not None:
            args.model = _random_model(args.random_model, args.data, Path(tmp) / "model")
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    model = args.model or "builtin:digits"
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n, t_enc, g, t_gen = _in_process(args, model)
    one_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = [(f"one process (core functions, {one_threads} threads)", n, t_enc, g, t_gen)]
    # Printed now as well: a long Ray run after it may be cut short.
    print(
        f"one process: {n} images encoded+inverted in {t_enc:.2f} s ({n / t_enc:.2f}/s), {g} generated in "
        f"{t_gen:.2f} s",
        flush=True,
    )
    if not args.skip_ray:
        with tempfile.TemporaryDirectory() as out:
            cfg = DistillConfig(
                data=args.data,
                model=model,
                output=out,
                ipc=args.ipc,
                candidates=args.candidates,
                batch_size=args.batch_size,
                steps=args.steps,
                inversion_step=args.inversion_step,
                encode="mean",
                max_actors=args.max_actors,
            )
            m = run_job(cfg).manifest
            s = m["stages"]
            r = m["resolved"]
            rows.append(
                (
                    f"Ray job (distill: {r['actors']} actor(s) x {r.get('actor_threads', '?')} threads)",
                    s["encode+invert+stats"]["items"],
                    s["encode+invert+stats"]["seconds"],
                    s["select+generate"]["items"],
                    s["select+generate"]["seconds"],
                )
            )
            rows.append(
                (
                    "  Ray job, whole run incl. start-up and writing",
                    s["encode+invert+stats"]["items"],
                    s["total"]["seconds"],
                    None,
                    None,
                )
            )
    print(
        f"# distill benchmark: data={args.data}, model={args.random_model or model}, steps={args.steps}, "
        f"K={args.inversion_step}, "
        f"IPC={args.ipc}, m={args.candidates}, batch={args.batch_size}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, ray {ray.__version__}, cores={os.cpu_count()}"
    )
    print("| run | images encoded+inverted | seconds | images/s | images generated | seconds | images/s |")
    print("|---|---|---|---|---|---|---|")
    for name, n_, te, g_, tg in rows:
        gen = f"{g_} | {tg:.2f} | {g_ / tg:.1f}" if g_ else "| |"
        print(f"| {name} | {n_} | {te:.2f} | {n_ / te:.1f} | {gen} |")
    return 0
