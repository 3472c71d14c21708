"""The Ray Train worker loops of `python -m d3hr_ray.finetune`, and their frozen loop configs.

    vae_loop(VAELoopConfig)   AutoencoderKL: reconstruction + beta * KL (training/objectives.py)
    dit_loop(DiTLoopConfig)   DDPM epsilon loss on VAE latents with class dropout; a sample grid per epoch

The maths is in `d3hr_ray.training.objectives` and `d3hr_ray.stages`; starting, resuming, saving and
reporting are the harness's (`d3hr_ray.training.harness`). What is left here is the per-batch order of calls.

Random streams (d3hr_ray/seeding.py) are named by purpose: the fresh weights by "finetune-vae-init"
or "finetune-dit-init"; the per-batch noise, timesteps and class dropout by (stage, epoch, rank), and
torch's global generator is keyed the same way (nothing should draw from it: diffusers' DiT's own
per-block label dropout is switched off, `disable_builtin_label_drop`). An epoch draws
the same numbers whether or not the run was resumed before it. The data reach the workers as Ray
Data shards, split dynamically: which images meet which draws depends on the worker count, so a run
is reproducible for a fixed --num-workers only up to that split.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from torchvision.utils import save_image

from d3hr_ray.models.loading import loader_options
from d3hr_ray.seeding import derive_seed, generator
from d3hr_ray.stages.diffusion import ModelSpec, alphas_cumprod_from_config
from d3hr_ray.stages.encode import decode, encode
from d3hr_ray.stages.generate import sample_from_noise
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.tracking import MLflowRun
from d3hr_ray.training import harness
from d3hr_ray.training.objectives import (
    VAETrainStep,
    builtin_label_dropout,
    diffusion_loss,
    disable_builtin_label_drop,
    draw_diffusion_inputs,
    drop_classes,
    latent_scaling_factor_from,
)

if TYPE_CHECKING:  # ray.train only for the annotations: it is imported after harness.use_train_v2() (see below)
    from ray.data import DataIterator
    from ray.train import Checkpoint

__all__ = [
    "SAMPLE_GRID_CLASSES",
    "SAMPLE_GRID_PER_CLASS",
    "SAMPLE_GUIDANCE",
    "DiTLoopConfig",
    "VAELoopConfig",
    "dit_loop",
    "vae_loop",
]

# The per-epoch sample grid (samples/epoch-NNNN.png): one row of SAMPLE_GRID_PER_CLASS images for
# each of the first SAMPLE_GRID_CLASSES classes, drawn from the same seeded noise every epoch so that
# the grids of successive epochs compare; guided with DiT's default classifier-free guidance scale.
SAMPLE_GRID_CLASSES = 10
SAMPLE_GRID_PER_CLASS = 8
SAMPLE_GUIDANCE = 4.0
# Posterior-sample batches of an epoch from which the VAE's latent scaling factor is measured
# (enough for a stable standard deviation, few enough to keep in memory).
SCALING_BATCHES = 16


@dataclass(frozen=True)
class VAELoopConfig:
    """What `vae_loop` needs; built by `finetune.run`."""

    vae_config: dict  # AutoencoderKL kwargs (no "_" keys); sample_size is the training resolution
    epochs: int
    batch_size: int  # images per worker per step
    lr: float
    kl_weight: float  # beta of the KL term
    seed: int
    torch_threads: int | None = None
    tracking: MLflowRun | None = None  # rank 0 logs every epoch's metrics there

    def __post_init__(self) -> None:
        if not (self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0 and self.kl_weight >= 0):
            raise ValueError(
                f"VAE loop: need epochs, batch_size >= 1, lr > 0, kl_weight >= 0; got {self.epochs}, "
                f"{self.batch_size}, {self.lr}, {self.kl_weight}"
            )
        if "latent_channels" not in self.vae_config or "block_out_channels" not in self.vae_config:
            raise ValueError(
                "VAE loop: vae_config must be an AutoencoderKL config (latent_channels, block_out_channels)"
            )


@dataclass(frozen=True)
class DiTLoopConfig:
    """What `dit_loop` needs; built by `finetune.run`."""

    vae_checkpoint: Checkpoint  # holding the (frozen) VAE under vae_subdir
    vae_subdir: str
    transformer_config: dict  # DiTTransformer2DModel kwargs, for a fresh transformer
    init_transformer: Checkpoint | None  # with transformer/ to fine-tune, or None for fresh weights
    scheduler_config: dict  # DDIMScheduler kwargs
    output: str  # where samples/epoch-NNNN.png go (local or s3://)
    epochs: int
    batch_size: int  # images per worker per step
    lr: float
    class_dropout: float
    sample_steps: int  # DDIM steps of the sample grid
    seed: int
    torch_threads: int | None = None
    tracking: MLflowRun | None = None  # rank 0 logs every epoch's metrics there

    def __post_init__(self) -> None:
        if not (self.epochs >= 1 and self.batch_size >= 1 and self.lr > 0 and self.sample_steps >= 1):
            raise ValueError(
                f"DiT loop: need epochs, batch_size, sample_steps >= 1 and lr > 0; got {self.epochs}, "
                f"{self.batch_size}, {self.sample_steps}, {self.lr}"
            )
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"DiT loop: class_dropout must be in [0, 1), got {self.class_dropout}")


def _batches(
    shard: DataIterator, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(x (B, 3, R, R) float32, y (B,) int64, skipped count) from a shard of `data.preprocess.training_rows`."""
    for b in shard.iter_torch_batches(
        batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64, "ok": torch.bool}
    ):
        ok = b["ok"]
        yield b["image"][ok].to(device), b["label"][ok].to(device), int((~ok).sum())


def vae_loop(cfg: VAELoopConfig) -> None:
    """Ray Train worker: train the AutoencoderKL; the checkpoint holds vae/ and the harness's files."""
    # ray.train reads RAY_TRAIN_V2_ENABLED when first imported: here, in a worker, after the driver's use_train_v2().
    import ray.train
    import ray.train.torch

    w = harness.worker(cfg.torch_threads)
    vae, resumed = harness.resume(lambda d: AutoencoderKL.from_pretrained(d / "vae", **loader_options()))
    if vae is None:
        torch.manual_seed(derive_seed(cfg.seed, "finetune-vae-init"))  # the same weights on every rank
        vae = AutoencoderKL(**cfg.vae_config)
    if harness.finish_if_done(resumed, cfg.epochs, w.rank):
        return
    history = list(resumed.history)
    step = ray.train.torch.prepare_model(VAETrainStep(vae.to(w.device), cfg.kl_weight))
    opt = torch.optim.AdamW(step.parameters(), lr=cfg.lr, weight_decay=0.0)
    if resumed.optimizer:
        opt.load_state_dict(resumed.optimizer)
    shard = ray.train.get_dataset_shard("train")
    c = cfg.vae_config["latent_channels"]
    f = 2 ** (len(cfg.vae_config["block_out_channels"]) - 1)  # the VAE's downsampling factor
    for epoch in range(resumed.start, cfg.epochs):
        g = generator(cfg.seed, "finetune-vae", epoch, w.rank, device=w.device)
        t, n, total, skipped = time.perf_counter(), 0, 0.0, 0
        latents: list[torch.Tensor] = []  # (B, c, h, w) posterior samples for the scaling factor
        step.train()
        for x, _, bad in _batches(shard, cfg.batch_size, w.device):
            skipped += bad
            if len(x) == 0:
                continue
            noise = torch.randn(
                (len(x), c, x.shape[-2] // f, x.shape[-1] // f), generator=g, device=w.device
            )  # (B, c, R/f, R/f)
            loss, rec, kl, z = step(x, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
            total += loss.item() * len(x)
            if len(latents) < SCALING_BATCHES:
                latents.append(z)
        metrics = {
            "stage": "vae",
            "epoch": epoch,
            "loss": total / max(n, 1),
            "images_per_s": n / (time.perf_counter() - t),
            "skipped": skipped,
        }
        history.append(metrics)

        def save(d: Path, latents: list[torch.Tensor] = latents) -> None:
            # Unit-variance latents for the DiT: measured on this epoch's posterior samples.
            vae.register_to_config(scaling_factor=latent_scaling_factor_from(latents))
            vae.save_pretrained(d / "vae")

        if w.rank == 0:
            print(
                f"[vae] epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.5f}, {metrics['images_per_s']:.0f} "
                "images/s",
                flush=True,
            )
        harness.save_and_report(
            metrics,
            rank=w.rank,
            save_model=save,
            optimizer=opt,
            state={"epoch": epoch, "history": history},
            tracking=cfg.tracking,
            metric_prefix="vae/",
        )


def dit_loop(cfg: DiTLoopConfig) -> None:
    """Ray Train worker: DDPM training of the DiT on VAE latents; a checkpoint and a sample grid per epoch."""
    # ray.train reads RAY_TRAIN_V2_ENABLED when first imported: here, in a worker, after the driver's use_train_v2().
    import ray.train
    import ray.train.torch

    w = harness.worker(cfg.torch_threads)
    with cfg.vae_checkpoint.as_directory() as d:
        vae = AutoencoderKL.from_pretrained(Path(d) / cfg.vae_subdir, **loader_options()).to(w.device).eval()
    vae.requires_grad_(False)
    transformer, resumed = harness.resume(
        lambda d: DiTTransformer2DModel.from_pretrained(d / "transformer", **loader_options())
    )
    if transformer is None and cfg.init_transformer is not None:
        with cfg.init_transformer.as_directory() as d:
            transformer = DiTTransformer2DModel.from_pretrained(Path(d) / "transformer", **loader_options())
    elif transformer is None:
        torch.manual_seed(derive_seed(cfg.seed, "finetune-dit-init"))  # the same weights on every rank
        transformer = DiTTransformer2DModel(**cfg.transformer_config)
    if harness.finish_if_done(resumed, cfg.epochs, w.rank):
        return
    history = list(resumed.history)
    # --class-dropout is the only label dropout (diffusers' DiT would add its own, per block). Not inside an
    # assert: `python -O` would skip the call.
    if disable_builtin_label_drop(transformer) == 0:
        raise ValueError(
            "the DiT has no LabelEmbedding whose dropout could be switched off (not a class-conditional DiT?)"
        )
    builtin_drop = builtin_label_dropout(transformer)  # recorded with every epoch: 0.0 (tests check it under -O)
    scheduler = DDIMScheduler(**cfg.scheduler_config)
    pipe = DiTPipeline(transformer=transformer.to(w.device), vae=vae, scheduler=scheduler)
    spec = ModelSpec.from_pipeline(pipe)
    alphas = alphas_cumprod_from_config(dict(scheduler.config)).to(w.device)
    model = ray.train.torch.prepare_model(transformer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if resumed.optimizer:
        opt.load_state_dict(resumed.optimizer)
    shard = ray.train.get_dataset_shard("train")
    out = OutputDir(cfg.output) if w.rank == 0 else None
    grid_labels = torch.arange(min(spec.num_classes, SAMPLE_GRID_CLASSES), device=w.device).repeat_interleave(
        SAMPLE_GRID_PER_CLASS
    )
    for epoch in range(resumed.start, cfg.epochs):
        g = generator(cfg.seed, "finetune-dit", epoch, w.rank, device=w.device)
        # keyed by purpose too, should anything in the model draw from torch's global generator
        torch.manual_seed(derive_seed(cfg.seed, "finetune-dit-token-drop", epoch, w.rank))
        t, n, total, skipped = time.perf_counter(), 0, 0.0, 0
        model.train()
        for x, y, bad in _batches(shard, cfg.batch_size, w.device):
            skipped += bad
            if len(x) == 0:
                continue
            with torch.no_grad():
                z0 = encode(pipe, x, mode="sample", generator=g)  # (B, c, h, w)
            tt, noise = draw_diffusion_inputs(z0, spec.num_train_timesteps, g)  # (B,), (B, c, h, w)
            yy = drop_classes(y, cfg.class_dropout, spec.null_class, g)  # (B,)
            loss = diffusion_loss(model, z0, yy, tt, noise, alphas, spec.latent_channels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
            total += loss.item() * len(x)
        metrics = {
            "stage": "dit",
            "epoch": epoch,
            "loss": total / max(n, 1),
            "images_per_s": n / (time.perf_counter() - t),
            "skipped": skipped,
            "builtin_label_dropout": builtin_drop,
        }
        history.append(metrics)
        if out is not None:  # rank 0
            transformer.eval()
            noise_g = generator(cfg.seed, "finetune-sample-grid", device=w.device)  # the same noise every epoch
            imgs = decode(
                pipe,
                sample_from_noise(
                    pipe, grid_labels, steps=cfg.sample_steps, guidance=SAMPLE_GUIDANCE, generator=noise_g
                ),
            )
            out.write_bytes(f"samples/epoch-{epoch + 1:04d}.png", _grid_png(imgs, SAMPLE_GRID_PER_CLASS))
            print(
                f"[dit] epoch {epoch + 1}/{cfg.epochs}: loss {metrics['loss']:.5f}, "
                f"{metrics['images_per_s']:.0f} images/s" + (f", {skipped} skipped" if skipped else ""),
                flush=True,
            )
        harness.save_and_report(
            metrics,
            rank=w.rank,
            save_model=lambda d: transformer.save_pretrained(d / "transformer"),
            optimizer=opt,
            state={"epoch": epoch, "history": history},
            tracking=cfg.tracking,
            metric_prefix="dit/",
        )


def _grid_png(images: torch.Tensor, nrow: int) -> bytes:
    """(N, 3, R, R) in [0, 1] -> PNG bytes of a grid with nrow images per row."""
    buf = io.BytesIO()
    save_image(images.float().cpu(), buf, format="png", nrow=nrow)
    return buf.getvalue()
