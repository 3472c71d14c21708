"""D3HR stage 1 (encode) and the last step of stage 5 (decode): images <-> scaled VAE latents.

    z0 = s * (sample(vae.encode(x).latent_dist) - shift)          (shift is None, i.e. 0, for DiT's VAE)
    image = clamp(vae.decode(z / s + shift) / 2 + 0.5, 0, 1)

`s` and `shift` are read from the VAE config (see `ModelSpec`). Latents come back in float32 whatever
the VAE's dtype (float64 stays float64), so the DDIM arithmetic that follows never runs in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from d3hr_ray.stages import ENCODE_MODES
from d3hr_ray.stages.diffusion import ModelSpec

__all__ = ["ENCODE_MODES", "decode", "encode"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least: bf16/fp16 model outputs are upcast before any arithmetic of ours.
    return torch.promote_types(dtype, torch.float32)


def _posterior_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of `shape` (B, c, h, w): one generator for the batch, or one per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]} images; pass one per image")
    # One draw per image, so an image's noise depends only on its own generator (its key), not the batch.
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in gens])


@torch.no_grad()
def encode(
    pipe: Any,
    images: torch.Tensor,
    *,
    mode: str = "sample",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """D3HR stage 1: images to scaled latents `z0`.

    Args:
        pipe: a `DiTPipeline` (its `vae` is used).
        images: (B, 3, R, R) float in [-1, 1], R = the model's resolution.
        mode: "sample" draws from the VAE posterior, as the reference does; "mean" takes its mean
            (deterministic, no generator needed).
        generator: noise for mode="sample": one `torch.Generator` for the whole batch, or a list of
            B generators (one per image, so that an image's latent does not depend on its batch).
    Returns:
        (B, c, R/f, R/f) float32 (float64 for a float64 VAE) scaled latents.
    """
    if mode not in ENCODE_MODES:
        raise ValueError(f"mode must be one of {ENCODE_MODES}, got {mode!r}")
    spec = ModelSpec.from_pipeline(pipe)
    vae = pipe.vae
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"images must be (B, {vae.config.in_channels}, R, R), got {tuple(images.shape)}")
    if images.shape[-2:] != (spec.resolution, spec.resolution):
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} but the model works at {spec.resolution}x{spec.resolution}; "
            "resize the shorter side to R and centre-crop first"
        )
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    work = _work_dtype(vae.dtype)
    mean = dist.mean.to(work)  # (B, c, h, w)
    if mode == "mean":
        latent = mean
    else:
        noise = _posterior_noise(tuple(mean.shape), generator, mean.device, work)  # (B, c, h, w)
        latent = mean + dist.std.to(work) * noise
    if spec.shift_factor is not None:
        latent = latent - spec.shift_factor
    return spec.scaling_factor * latent


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to images in [0, 1] (the end of D3HR stage 5).

    Args:
        pipe: a `DiTPipeline` (its `vae` is used).
        latents: (B, c, h, w) scaled latents, any float dtype.
    Returns:
        (B, 3, h*f, w*f) float32 (float64 for a float64 VAE) images in [0, 1].
    """
    spec = ModelSpec.from_pipeline(pipe)
    vae = pipe.vae
    if latents.ndim != 4 or latents.shape[1] != spec.latent_channels:
        raise ValueError(f"latents must be (B, {spec.latent_channels}, h, w), got {tuple(latents.shape)}")
    z = latents.to(_work_dtype(latents.dtype)) / spec.scaling_factor
    if spec.shift_factor is not None:
        z = z + spec.shift_factor
    x = vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample  # (B, 3, H, W)
    return (x.to(_work_dtype(vae.dtype)) / 2 + 0.5).clamp(0, 1)
