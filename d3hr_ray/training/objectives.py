"""Training objectives for the models D3HR needs, pure torch (Ray Train calls these per batch).

DiT (DDPM, Ho et al. 2020, as DiT trains): for clean latents z0, uniform t in 0..T-1 and eps ~ N(0, I),

    z_t = sqrt(a(t)) z0 + sqrt(1 - a(t)) eps,      loss = mean |eps_theta(z_t, t, y') - eps|^2,

where y' is the label replaced by the null class with probability p (class dropout, so classifier-free
guidance has an unconditional model to contrast with). diffusers' DiT has a label dropout of its own
(p = 0.1, hard-coded) in every block's AdaLayerNormZero, drawn independently per block in training
mode: `disable_builtin_label_drop` turns it off, so that p is the only dropout and every block of a
sample sees the same label, as at sampling time. The model's learned-variance half is present
(the pipeline layout matches DiT's) but not trained here: only the epsilon half enters the loss.

VAE: reconstruction MSE + beta * KL(q(z|x) || N(0, I)), the KL averaged per latent element.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from diffusers.models.embeddings import LabelEmbedding

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "VAETrainStep",
    "diffusion_loss",
    "builtin_label_dropout",
    "disable_builtin_label_drop",
    "draw_diffusion_inputs",
    "drop_classes",
    "latent_scaling_factor_from",
]


def drop_classes(
    labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by `null_class` with probability p.

    Args:
        labels: (B,) int64.
        p: dropout probability in [0, 1].
        null_class: the CFG null id (the model's `num_embeds_ada_norm`).
    Returns:
        (B,) int64.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"class dropout must be in [0, 1], got {p}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p  # (B,)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def disable_builtin_label_drop(transformer: torch.nn.Module) -> int:
    """Switch off diffusers' own training-mode label dropout in a DiT; returns how many were switched off.

    `DiTTransformer2DModel` gives each block an `AdaLayerNormZero` with its own `LabelEmbedding`
    (dropout_prob 0.1, not a config field), which in training mode replaces labels by the null class
    with an independent draw per block. On top of `drop_classes` that makes the null rate
    1 - (1 - p) * 0.9 per block, and 1 - 0.9^L of the samples (47 % with 6 layers) train with some
    blocks conditioned and others not, a state that never occurs at sampling. The embedding table keeps
    its null row (sized at construction), so classifier-free guidance is unaffected.
    """
    n = 0
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            n += 1
    return n


def builtin_label_dropout(transformer: torch.nn.Module) -> float:
    """The largest training-mode dropout of diffusers' per-block `LabelEmbedding`s in a DiT (0 once switched off)."""
    return max((float(m.dropout_prob) for m in transformer.modules() if isinstance(m, LabelEmbedding)), default=0.0)


def draw_diffusion_inputs(
    z0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform timesteps (B,) int64 in 0..T-1 and noise like z0 (B, c, h, w)."""
    t = torch.randint(0, num_train_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
    return t, torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)


def diffusion_loss(
    model: torch.nn.Module,
    z0: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    latent_channels: int,
) -> torch.Tensor:
    """The DDPM epsilon loss for one batch (class dropout already applied to `labels`).

    Args:
        model: a DiTTransformer2DModel (or its DDP wrapper), in training mode.
        z0: (B, c, h, w) float32 clean scaled latents.
        labels: (B,) int64 class ids, the null class where dropped.
        t: (B,) int64 timesteps; noise: (B, c, h, w) standard normal.
        alphas_cumprod: (T,) a(t), float64 or float32, on any device.
        latent_channels: c; the output's first c channels are epsilon.
    Returns:
        () float32 mean squared error.
    """
    a = alphas_cumprod.to(device=z0.device, dtype=torch.float32)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise  # (B, c, h, w)
    out = model(zt, timestep=t, class_labels=labels, return_dict=False)[0]  # (B, c or 2c, h, w)
    return torch.nn.functional.mse_loss(out[:, :latent_channels].float(), noise)


class VAETrainStep(torch.nn.Module):
    """One VAE training forward as a single module call (so DDP sees it): reconstruction + KL.

    forward(x (B, 3, R, R) in [-1, 1], noise (B, c, h, w) standard normal) returns
    (loss, reconstruction MSE, KL per latent element, posterior sample (B, c, h, w)), the first three () float32.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, float(kl_weight)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * noise  # (B, c, h, w)
        recon = self.vae.decode(z).sample  # (B, 3, R, R)
        rec = torch.nn.functional.mse_loss(recon, x)
        kl = 0.5 * (dist.mean**2 + dist.var - 1.0 - dist.logvar).mean()  # KL(q || N(0, I)) per element
        return rec + self.kl_weight * kl, rec.detach(), kl.detach(), z.detach()


def latent_scaling_factor_from(samples: Iterable[torch.Tensor]) -> float:
    """1 / std over posterior samples (tensors of any shape): the factor that gives unit-variance latents.

    (The recipe behind the Stable Diffusion VAE's published scaling factor, applied to the VAE at hand.)
    """
    n, s, s2 = 0, 0.0, 0.0
    for z in samples:
        z = z.double()
        n += z.numel()
        s += z.sum().item()
        s2 += (z * z).sum().item()
    var = s2 / n - (s / n) ** 2
    return float(1.0 / max(var, 1e-12) ** 0.5)
