"""Stage 5 (DDIM sampling) against a float64 loop written here from D3HR.md, and plain sampling from noise."""

import numpy as np
import pytest
import torch

from d3hr_ray import sample
from d3hr_ray.stages.generate import sample_from_noise
from tests.conftest import rel_err
from tests.stages.conftest import ref_alphas, ref_eps


def ref_sample(model64, cfg, zK, y, steps, K, w):
    a = ref_alphas(cfg)
    dt = cfg["num_train_timesteps"] // steps
    z = zK.double()
    t = K * dt
    while t > 0:
        tp = t - dt
        e = ref_eps(model64, z, t, y, w)
        x0 = (z - np.sqrt(1 - a[t]) * e) / np.sqrt(a[t])
        z = np.sqrt(a[tp]) * x0 + np.sqrt(1 - a[tp]) * e
        t = tp
    return z


@torch.no_grad()
@pytest.mark.parametrize("steps,K,w", [(50, 30, 4.0), (50, 1, 1.0), (25, 12, 3.0)])
def test_sample_matches_reference(tiny_pipe, ref_models, batch, steps, K, w):
    model64, _ = ref_models
    zK, y = batch
    ref = ref_sample(model64, tiny_pipe.scheduler.config, zK, y, steps, K, w)
    out = sample(tiny_pipe, zK, y, steps=steps, start_step=K, guidance=w)
    assert out.shape == zK.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5


@torch.no_grad()
def test_sample_reads_the_schedule_from_the_config(other_schedule_pipe, ref_models, batch):
    model64, _ = ref_models
    zK, y = batch
    ref = ref_sample(model64, other_schedule_pipe.scheduler.config, zK, y, 25, 15, 4.0)
    assert rel_err(sample(other_schedule_pipe, zK, y, steps=25, start_step=15), ref) <= 1e-5


@torch.no_grad()
def test_sample_is_batched_per_item(tiny_pipe, batch):
    """Each latent's result does not depend on what else is in its batch."""
    zK, y = batch
    whole = sample(tiny_pipe, zK, y, steps=10, start_step=5)
    single = torch.cat([sample(tiny_pipe, zK[i : i + 1], y[i : i + 1], steps=10, start_step=5) for i in range(4)])
    assert rel_err(whole, single) <= 1e-5


@torch.no_grad()
def test_sample_from_noise_denoises_standard_normal_latents_from_the_top_of_the_grid(tiny_pipe, ref_models):
    """N(0, I) latents drawn from the generator, denoised from tau_{N-1} to tau_0."""
    model64, _ = ref_models
    y = torch.tensor([1, 1, 7])
    out = sample_from_noise(tiny_pipe, y, steps=10, guidance=2.0, generator=torch.Generator().manual_seed(5))
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))  # (B, c, h, w) of the tiny pipeline
    ref = ref_sample(model64, tiny_pipe.scheduler.config, z, y, 10, 9, 2.0)
    assert out.shape == (3, 4, 4, 4) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5


def test_invalid_arguments_are_named(tiny_pipe, batch):
    z, y = batch
    with pytest.raises(ValueError, match="start_step"):
        sample(tiny_pipe, z, y, steps=10, start_step=0)
    with pytest.raises(ValueError, match="start_step"):
        sample(tiny_pipe, z, y, steps=10, start_step=10)
    with pytest.raises(ValueError, match="latents must be"):
        sample(tiny_pipe, torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), steps=10, start_step=2)
    with pytest.raises(ValueError, match="class ids in 0..9"):
        sample(tiny_pipe, z, torch.tensor([0, 1, 2, 10]), steps=10, start_step=2)
