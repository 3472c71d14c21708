"""What the stages need to know about a DiT pipeline, read from its own configs.

Nothing here is specific to DiT-XL/2: the VAE scaling factor, the null class used by classifier-free
guidance, the latent shape, the learned-sigma split and the beta schedule all come from the
`transformer`, `vae` and `scheduler` configs of the pipeline (docs/method.md, "Notation").

Also home of the two pieces that inversion (stage 2) and generation (stage 5) share: the DDIM
timestep grid `tau_k` and the guided noise `e(z, t, y)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelSpec", "alphas_cumprod_from_config", "ddim_timesteps", "guided_eps"]


def _betas_linear(cfg: dict, n: int) -> torch.Tensor:
    return torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)


def _betas_scaled_linear(cfg: dict, n: int) -> torch.Tensor:
    # Latent-diffusion schedule: linear in sqrt(beta).
    return torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2


def _betas_squaredcos_cap_v2(cfg: dict, n: int) -> torch.Tensor:
    # Nichol & Dhariwal cosine schedule, betas capped at 0.999 as diffusers does.
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)


# Registry: scheduler config `beta_schedule` -> betas (T,) float64.
BETA_SCHEDULES = {
    "linear": _betas_linear,
    "scaled_linear": _betas_scaled_linear,
    "squaredcos_cap_v2": _betas_squaredcos_cap_v2,
}


def alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    """`a(t)` for t = 0..T-1 from a diffusers scheduler config.

    Computed in float64 from `num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end`
    (or `trained_betas`), so that the schedule carries no float32 rounding into the DDIM updates.

    Returns:
        (T,) float64.
    """
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
    else:
        name = cfg.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise ValueError(
                f"scheduler beta_schedule {name!r} is not supported; expected one of {sorted(BETA_SCHEDULES)}"
            )
        betas = BETA_SCHEDULES[name](cfg, n)
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"scheduler prediction_type {cfg.get('prediction_type')!r}: D3HR needs an epsilon-predicting model"
        )
    # Settings that change the schedule or the grid in ways this module does not implement: refused, not ignored.
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(
            "scheduler rescale_betas_zero_snr=True is not supported (D3HR's DDIM uses the betas as they are)"
        )
    if cfg.get("timestep_spacing", "leading") != "leading":
        raise ValueError(
            f"scheduler timestep_spacing {cfg.get('timestep_spacing')!r} is not supported; "
            "D3HR's grid is 'leading' (k * T / N)"
        )
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class ModelSpec:
    """Constants of one pipeline, every one read from its configs.

    Attributes:
        scaling_factor: `s`, vae.config.scaling_factor.
        shift_factor: vae.config.shift_factor (None for DiT's VAE): z = s * (latent - shift).
        num_classes: C, transformer.config.num_embeds_ada_norm.
        null_class: the CFG null label, row C of the class embedding (= num_classes).
        latent_channels: c, transformer.config.in_channels.
        latent_size: h = w, transformer.config.sample_size.
        resolution: R, image side = latent_size * VAE downsampling factor.
        learned_sigma: out_channels == 2 * in_channels; epsilon is the first `c` channels.
        num_train_timesteps: T.
        steps_offset: scheduler config steps_offset (0 for DiT).
    """

    scaling_factor: float
    shift_factor: float | None
    num_classes: int
    null_class: int
    latent_channels: int
    latent_size: int
    resolution: int
    learned_sigma: bool
    num_train_timesteps: int
    steps_offset: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one latent."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def latent_dim(self) -> int:
        """D = c * h * w."""
        c, h, w = self.latent_shape
        return c * h * w

    @classmethod
    def from_pipeline(cls, pipe: Any) -> ModelSpec:  # a DiTPipeline or anything with its three parts
        """Read the spec from a diffusers `DiTPipeline` (or anything with the same three parts)."""
        return cls.from_configs(dict(pipe.transformer.config), dict(pipe.vae.config), dict(pipe.scheduler.config))

    @classmethod
    def from_configs(cls, tcfg: dict, vcfg: dict, scfg: dict) -> ModelSpec:
        """Read the spec from the transformer, VAE and scheduler config dicts (no weights needed)."""
        if tcfg.get("num_embeds_ada_norm") is None:
            raise ValueError("transformer config num_embeds_ada_norm is None: D3HR needs a class-conditional DiT")
        c = int(tcfg["in_channels"])
        out_channels = tcfg.get("out_channels") or c
        if out_channels not in (c, 2 * c):
            raise ValueError(
                f"transformer out_channels={out_channels} must equal in_channels={c} "
                "(epsilon only) or twice it (epsilon and learned variance)"
            )
        if vcfg["latent_channels"] != c:
            raise ValueError(f"vae latent_channels={vcfg['latent_channels']} != transformer in_channels={c}")
        # Each extra VAE block halves the side (diffusers' AutoencoderKL layout).
        factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
        shift = vcfg.get("shift_factor")
        return cls(
            scaling_factor=float(vcfg["scaling_factor"]),
            shift_factor=None if shift is None else float(shift),
            num_classes=int(tcfg["num_embeds_ada_norm"]),
            null_class=int(tcfg["num_embeds_ada_norm"]),
            latent_channels=c,
            latent_size=int(tcfg["sample_size"]),
            resolution=int(tcfg["sample_size"]) * factor,
            learned_sigma=out_channels == 2 * c,
            num_train_timesteps=int(scfg["num_train_timesteps"]),
            steps_offset=int(scfg.get("steps_offset", 0) or 0),
        )


def ddim_timesteps(spec: ModelSpec, steps: int) -> list[int]:
    """The DDIM grid with "leading" spacing: tau_k = k * (T // N) + steps_offset, k = 0..N-1.

    Args:
        steps: N, the number of inference steps (50 in D3HR).
    Returns:
        N increasing ints, tau_0 first (0, 20, ..., 980 for T = 1000, N = 50).
    """
    if not 1 <= steps <= spec.num_train_timesteps:
        raise ValueError(
            f"steps must be in 1..{spec.num_train_timesteps} (the model's num_train_timesteps), got {steps}"
        )
    ratio = spec.num_train_timesteps // steps
    return [k * ratio + spec.steps_offset for k in range(steps)]


def guided_eps(
    pipe: Any, spec: ModelSpec, z: torch.Tensor, t: int, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Classifier-free-guided noise `e(z, t, y) = e0 + w * (ey - e0)` (docs/method.md, "Notation").

    `ey` and `e0` come from one forward pass over the doubled batch [z; z] with labels [y; null].
    With w == 1 the guided noise is `ey` exactly, so the null half is skipped.

    Args:
        z: (B, c, h, w) latents at timestep t, float32 (or float64); the model runs in its own dtype.
        t: the timestep (an int in 0..T-1).
        labels: (B,) int64 class ids in 0..C-1.
        guidance: w.
    Returns:
        (B, c, h, w) in z's dtype: the first `c` output channels (the learned-variance half is dropped).
    """
    model = pipe.transformer
    if model.training:
        # In training mode the label embedding drops classes at random (class dropout for CFG).
        raise ValueError(
            "pipe.transformer is in training mode (random class dropout); call pipe.transformer.eval() first"
        )
    dtype = model.dtype
    b = z.shape[0]
    if guidance == 1.0:
        zz, yy = z, labels
    else:
        zz = torch.cat([z, z], dim=0)  # (2B, c, h, w)
        yy = torch.cat([labels, torch.full_like(labels, spec.null_class)], dim=0)  # (2B,)
    tt = torch.full((zz.shape[0],), t, device=z.device, dtype=torch.int64)  # (2B,)
    out = model(zz.to(dtype), timestep=tt, class_labels=yy, return_dict=False)[0]  # (2B, c or 2c, h, w)
    eps = out[:, : spec.latent_channels].to(z.dtype)  # (2B, c, h, w)
    if guidance == 1.0:
        return eps
    ey, e0 = eps[:b], eps[b:]
    return e0 + guidance * (ey - e0)
