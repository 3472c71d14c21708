"""Stages 2 (DDIM inversion) and 5 (DDIM sampling) against float64 loops written here from D3HR.md."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline

from d3hr_ray import invert, sample
from tests.conftest import rel_err


def ref_alphas(cfg) -> np.ndarray:
    """a(t) = prod_{s<=t} (1 - beta_s), linear betas, float64."""
    assert cfg["beta_schedule"] == "linear"
    betas = np.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ref_eps(model64, z, t, y, w):
    """e = e0 + w (ey - e0); ey, e0 from one pass over [z; z] with labels [y; null]."""
    null = model64.config.num_embeds_ada_norm
    c = model64.config.in_channels
    zz = torch.cat([z, z])
    yy = torch.cat([y, torch.full_like(y, null)])
    out = model64(zz, timestep=torch.full((len(zz),), t), class_labels=yy).sample[:, :c]
    ey, e0 = out[: len(z)], out[len(z) :]
    return e0 + w * (ey - e0)


def ref_invert(model64, cfg, z0, y, steps, K, w):
    a = ref_alphas(cfg)
    tau = [k * (cfg["num_train_timesteps"] // steps) for k in range(steps)]
    z = z0.double()
    for k in range(1, K + 1):
        t, tp = tau[k], tau[k - 1]
        e = ref_eps(model64, z, t, y, w)
        z = np.sqrt(a[t]) * (z - np.sqrt(1 - a[tp]) * e) / np.sqrt(a[tp]) + np.sqrt(1 - a[t]) * e
    return z


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


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 4, 4, 4, generator=g), torch.tensor([0, 3, 3, 9])


@pytest.fixture(scope="module")
def other_schedule_pipe(tiny_pipe):
    """The same weights under a different schedule: T = 500, other betas (nothing is hard-coded)."""
    sched = DDIMScheduler(
        num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule="linear", clip_sample=False
    )
    return DiTPipeline(transformer=tiny_pipe.transformer, vae=tiny_pipe.vae, scheduler=sched)


@torch.no_grad()
@pytest.mark.parametrize("steps,K,w", [(50, 30, 4.0), (50, 3, 1.0), (20, 19, 2.5)])
def test_invert_matches_reference(tiny_pipe, ref_models, batch, steps, K, w):
    model64, _ = ref_models
    z0, y = batch
    ref = ref_invert(model64, tiny_pipe.scheduler.config, z0, y, steps, K, w)
    out = invert(tiny_pipe, z0, y, steps=steps, inversion_step=K, guidance=w)
    assert out.shape == z0.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, z0) > 1e-2  # the latents really moved


@torch.no_grad()
def test_invert_reads_the_schedule_from_the_config(other_schedule_pipe, ref_models, batch):
    model64, _ = ref_models
    z0, y = batch
    ref = ref_invert(model64, other_schedule_pipe.scheduler.config, z0, y, 25, 15, 4.0)
    assert rel_err(invert(other_schedule_pipe, z0, y, steps=25, inversion_step=15), ref) <= 1e-5


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


def test_invalid_arguments_are_named(tiny_pipe, batch):
    z, y = batch
    with pytest.raises(ValueError, match="inversion_step"):
        invert(tiny_pipe, z, y, steps=50, inversion_step=50)
    with pytest.raises(ValueError, match="start_step"):
        sample(tiny_pipe, z, y, steps=10, start_step=0)
    with pytest.raises(ValueError, match="class ids in 0..9"):
        invert(tiny_pipe, z, torch.tensor([0, 1, 2, 10]), steps=10, inversion_step=2)
    with pytest.raises(ValueError, match="labels must be"):
        invert(tiny_pipe, z, torch.tensor([0, 1]), steps=10, inversion_step=2)
    with pytest.raises(ValueError, match="latents must be"):
        sample(tiny_pipe, torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), steps=10, start_step=2)
