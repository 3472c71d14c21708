"""D3HR stage 5: denoise chosen latents with DDIM + CFG from tau_K down to 0.

For t = tau_K, tau_{K-1}, ..., tau_1 and t' = t - T/N:

    x0 = (z - sqrt(1 - a(t)) * e) / sqrt(a(t))
    z  <- sqrt(a(t')) * x0 + sqrt(1 - a(t')) * e,          e = e(z, t, y)

ending at t' = tau_0 (the clean form; the reference clamps and adds a step at t = 0). Sampling starts
where the inversion stopped unless `start_step` says otherwise (the reference starts one step above).
The whole batch is denoised at once; the reference makes one image at a time. Decode with `decode`.
"""

from __future__ import annotations

from typing import Any

import torch

from d3hr_ray.stages.diffusion import (
    ModelSpec,
    guided_eps,
)
from d3hr_ray.stages.invert import walk_inputs

__all__ = ["sample"]


@torch.no_grad()
def sample(
    pipe: Any,
    zK: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 50,
    start_step: int = 30,
    guidance: float = 4.0,
) -> torch.Tensor:
    """D3HR stage 5: DDIM sampling with classifier-free guidance from tau_{start_step} to tau_0.

    Args:
        pipe: a class-conditional `DiTPipeline`.
        zK: (B, c, h, w) latents at timestep tau_{start_step} (e.g. from `select_group`, reshaped).
        labels: (B,) int class ids, one per latent.
        steps: N, the DDIM grid size.
        start_step: K, where sampling starts (tau_K).
        guidance: w.
    Returns:
        (B, c, h, w) float32 (float64 if zK is float64) clean scaled latents.
    """
    spec, labels, a, tau, z = walk_inputs(pipe, zK, labels, steps, start_step, "start_step")
    for k in range(start_step, 0, -1):
        t, t_prev = tau[k], tau[k - 1]
        e = guided_eps(pipe, spec, z, t, labels, guidance)  # (B, c, h, w)
        a_t, a_prev = a[t].item(), a[t_prev].item()
        # D3HR stage 5: x0 = (z - sqrt(1 - a_t) e) / sqrt(a_t);  z <- sqrt(a_t') x0 + sqrt(1 - a_t') e
        x0 = (z - (1 - a_t) ** 0.5 * e) / (a_t**0.5)
        z = (a_prev**0.5) * x0 + (1 - a_prev) ** 0.5 * e
    return z


@torch.no_grad()
def sample_from_noise(
    pipe: Any,
    labels: torch.Tensor,
    *,
    steps: int = 50,
    guidance: float = 4.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Plain class-conditional generation (not D3HR): N(0, I) latents at the top of the grid, denoised.

    For sample grids of a model being trained and for checking that it knows its classes.

    Args:
        labels: (B,) int class ids.
    Returns:
        (B, c, h, w) float32 clean scaled latents (decode them with `decode`).
    """
    spec = ModelSpec.from_pipeline(pipe)
    device = pipe.transformer.device
    labels = torch.as_tensor(labels, device=device)
    z = torch.randn((len(labels), *spec.latent_shape), generator=generator, device=device)  # (B, c, h, w)
    return sample(pipe, z, labels, steps=steps, start_step=steps - 1, guidance=guidance)
