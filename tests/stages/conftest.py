"""The stages' shared references: D3HR.md's schedule and guided noise in float64, and the latents they run on."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline


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


@pytest.fixture(scope="module")
def batch():
    """(4, 4, 4, 4) latents of the tiny pipeline and their labels (4,)."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 4, 4, 4, generator=g), torch.tensor([0, 3, 3, 9])


@pytest.fixture(scope="module")
def other_schedule_pipe(tiny_pipe):
    """The same weights under a different schedule: T = 500, other betas (nothing is hard-coded)."""
    sched = DDIMScheduler(
        num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule="linear", clip_sample=False
    )
    return DiTPipeline(transformer=tiny_pipe.transformer, vae=tiny_pipe.vae, scheduler=sched)
