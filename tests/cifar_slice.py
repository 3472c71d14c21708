"""A slice of real CIFAR-10 and a tiny DiT for the distill job's tests: constants, the reference preprocessing,
and `job`, the job run in this process (the fixtures that build on them are in tests/conftest.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import run
from d3hr_ray.flags import config_from_args

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"
CLASSES = ["airplane", "automobile", "bird", "cat"]
PER_CLASS = 9

needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10 (CI has it beside the clone)")


def ref_preprocess(path: Path, r: int) -> torch.Tensor:
    """Stage 1 preprocessing by hand: RGB, shorter side to R (bicubic), centre crop, [-1, 1]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = r / min(w, h)
    img = img.resize((max(r, round(w * s)), max(r, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (img.width - r) // 2, (img.height - r) // 2
    img = img.crop((left, top, left + r, top + r))
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding of the model's batched arithmetic: 1e-5 of the values' scale (the job's tolerance)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def job(tmp_path, name, *flags):
    """The job in this process on the tests' Ray (`ray_local`). One model actor per pool unless the flags say otherwise
    (a later flag wins): the cluster's default here is 4 (4 logical CPUs), and on 2 cores each extra actor's
    start (torch, diffusers, the model: 5-10 s) costs more than it computes on these 36 images. Two actors
    run in tests/steps/test_estimate.py (test_statistics_do_not_depend_on_batches_or_actors); the default sizing
    in tests/system/test_submit.py."""
    cfg = config_from_args(
        DistillConfig, ["--max-actors", "1", "--output", str(tmp_path / name), *flags]
    )  # a later --output wins
    return run(cfg).manifest, tmp_path / name
