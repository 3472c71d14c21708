"""`python -m d3hr_ray.finetune`: train or fine-tune the class-conditional DiT that D3HR needs, on Ray Train.

    [--train-vae]  AutoencoderKL on the images (reconstruction + KL), for low-resolution data
    DiT            DDPM epsilon loss on VAE latents, uniform timesteps, 10% class dropout to the null class

Both run as `ray.train.torch.TorchTrainer` jobs: DDP over --num-workers workers (GPUs when the cluster
has them), the data streamed to each worker with `get_dataset_shard`, a checkpoint every epoch under
--storage-path/--name, --max-failures retries; rerunning the same command resumes from the last
checkpoint. The result is a complete DiTPipeline folder (transformer, vae, DDIM scheduler, id2label)
that `load_pipeline` and diffusers' `DiTPipeline.from_pretrained` load, plus samples/epoch-NNNN.png.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from d3hr_ray.config import ConfigError, build_parser, config_from_args, require

__all__ = ["FinetuneConfig", "main", "run"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `python -m d3hr_ray.finetune` needs. Field docs are the flags' help texts."""

    data: str = field(default="digits", metadata={"help": "training images: ImageFolder, Parquet (local or s3://) or 'digits'"})
    output: str = field(default="dit-output", metadata={"help": "where the DiTPipeline folder goes (local or s3://)"})
    init: str | None = field(default=None, metadata={"help": "fine-tune this pipeline (folder, s3://, hub id); its VAE is kept unless --train-vae"})
    dit: str = field(default="mini", metadata={"help": "DiT size when training from scratch: tiny, mini, S/2, B/2, L/2, XL/2"})
    vae: str = field(default="small", metadata={"help": "VAE config for --train-vae: tiny, small, sd"})
    train_vae: bool = field(default=False, metadata={"help": "train a VAE on the images first (no pretrained one for low-resolution data here)"})
    resolution: int | None = field(default=None, metadata={"help": "image side R (default: the --init model's, else the VAE config's sample_size)"})
    epochs: int = field(default=100, metadata={"help": "DiT epochs"})
    vae_epochs: int = field(default=20, metadata={"help": "VAE epochs (with --train-vae)"})
    batch_size: int = field(default=128, metadata={"help": "images per worker per step"})
    lr: float = field(default=1e-4, metadata={"help": "DiT AdamW learning rate (DiT's own)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate"})
    kl_weight: float = field(default=1e-4, metadata={"help": "beta of the VAE's KL term"})
    class_dropout: float = field(default=0.1, metadata={"help": "probability of replacing a label by the null class"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (DDP)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "workers take a GPU each (default: when the cluster has GPUs)"})
    name: str = field(default="d3hr-dit", metadata={"help": "run name; rerunning with the same name and storage resumes"})
    storage_path: str | None = field(default=None, metadata={"help": "checkpoints (local or s3://; default ~/ray_results)"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint before giving up"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps for the per-epoch sample grid"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, noise and dropout"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch threads per worker (default: Ray's, one per CPU the worker reserves, i.e. 1); on a CPU-only node set it to the cores"})

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            require(self, ok, name, what)

        for name in ("epochs", "batch_size", "num_workers", "sample_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(isinstance(self.vae_epochs, int) and self.vae_epochs >= 1, "vae_epochs", "must be an integer >= 1")
        need(self.lr > 0 and self.vae_lr > 0, "lr", "and --vae-lr must be > 0")
        need(self.kl_weight >= 0, "kl_weight", "must be >= 0")
        need(0 <= self.class_dropout < 1, "class_dropout", "must be in [0, 1)")
        need(self.max_failures >= 0, "max_failures", "must be >= 0")
        need(self.init is not None or self.train_vae, "init", "or --train-vae is needed (a DiT trains on the latents of some VAE)")
        if self.resolution is not None:
            need(self.resolution >= 1, "resolution", "must be >= 1")
        need(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        if self.torch_threads is not None:
            need(isinstance(self.torch_threads, int) and self.torch_threads >= 1, "torch_threads", "must be an integer >= 1")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


# -- the workers' loops (run inside Ray Train) ----------------------------------------------------

def _batches(shard, batch_size: int, device):
    """(x (B, 3, R, R) float32, y (B,) int64, skipped count) from a shard of preprocessed rows."""
    import torch

    for b in shard.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.float32, "label": torch.int64, "ok": torch.bool}):
        ok = b["ok"]
        yield b["image"][ok].to(device), b["label"][ok].to(device), int((~ok).sum())


def _training_rows(batch: dict) -> dict:
    """Preprocessed rows -> tensors only: a skipped image keeps its row, flagged, so workers can count it."""
    import numpy as np

    ok = np.array([not r for r in batch["reason"]], dtype=bool)
    return {"image": batch["image"], "label": batch["label"], "ok": ok}


def _resume(model_cls, subdir: str, fresh):
    """(model, optimizer state, first epoch, history) from this run's last checkpoint, if it has one.

    Without one: (fresh(), None, 0, []). Rerunning a job with the same name and storage path lands
    here with the last checkpoint, so training continues where it stopped.
    """
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return fresh(), None, 0, []
    with ckpt.as_directory() as d:
        model = model_cls.from_pretrained(Path(d) / subdir)
        opt_state = torch.load(Path(d) / "optimizer.pt", weights_only=True)
        state = json.loads((Path(d) / "state.json").read_text())
    return model, opt_state, state["epoch"] + 1, state["history"]


def _finished(start: int, epochs: int, history: list, rank: int) -> bool:
    """A rerun of a run that already has all its epochs: hand its last checkpoint back as the result.

    Lets a finished (or deliberately shortened: rerun with a smaller --epochs) run assemble its output
    without training again.
    """
    import ray.train

    if start < epochs or not history:
        return False
    with ray.train.get_checkpoint().as_directory() as d:
        ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
    return True


def _save_epoch(d: Path, model, subdir: str, opt, epoch: int, history: list) -> None:
    """A checkpoint folder: the model (diffusers layout), the optimizer state, the epoch and all metrics so far."""
    import torch

    model.save_pretrained(d / subdir)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "state.json").write_text(json.dumps({"epoch": epoch, "history": history}))


def vae_loop(config: dict) -> None:
    """Ray Train worker: train the AutoencoderKL; the checkpoint holds the VAE folder and state.json."""
    import ray.train
    import torch
    from diffusers import AutoencoderKL

    from d3hr_ray.training.objectives import VAETrainStep, latent_scaling_factor_from

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])
    torch.manual_seed(config["seed"])
    vae, opt_state, start, history = _resume(AutoencoderKL, "vae", lambda: AutoencoderKL(**config["vae_config"]))
    if _finished(start, config["epochs"], history, rank):
        return
    step = ray.train.torch.prepare_model(VAETrainStep(vae.to(device), config["kl_weight"]))
    opt = torch.optim.AdamW(step.parameters(), lr=config["lr"], weight_decay=0.0)
    if opt_state:
        opt.load_state_dict(opt_state)
    shard = ray.train.get_dataset_shard("train")
    g = torch.Generator(device=device).manual_seed(config["seed"] * 1000 + rank)
    c = config["vae_config"]["latent_channels"]
    f = 2 ** (len(config["vae_config"]["block_out_channels"]) - 1)
    for epoch in range(start, config["epochs"]):
        t, n, total, skipped, latents = time.perf_counter(), 0, 0.0, 0, []
        step.train()
        for x, _, bad in _batches(shard, config["batch_size"], device):
            skipped += bad
            if len(x) == 0:
                continue
            noise = torch.randn((len(x), c, x.shape[-2] // f, x.shape[-1] // f), generator=g, device=device)
            loss, rec, kl, z = step(x, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
            total += loss.item() * len(x)
            if len(latents) < 16:
                latents.append(z)
        metrics = {"stage": "vae", "epoch": epoch, "loss": total / max(n, 1), "images_per_s": n / (time.perf_counter() - t), "skipped": skipped}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                # Unit-variance latents for the DiT: measured on this epoch's posterior samples.
                vae.register_to_config(scaling_factor=latent_scaling_factor_from(latents))
                history.append(metrics)
                _save_epoch(Path(d), vae, "vae", opt, epoch, history)
                print(f"[vae] epoch {epoch + 1}/{config['epochs']}: loss {metrics['loss']:.5f}, {metrics['images_per_s']:.0f} images/s", flush=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def dit_loop(config: dict) -> None:
    """Ray Train worker: DDPM training of the DiT on VAE latents; a checkpoint and a sample grid per epoch."""
    import ray.train
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
    )

    from d3hr_ray.io.fs import OutputDir
    from d3hr_ray.stages.diffusion import ModelSpec, alphas_cumprod_from_config
    from d3hr_ray.stages.encode import decode, encode
    from d3hr_ray.stages.generate import sample_from_noise
    from d3hr_ray.training.objectives import (
        diffusion_loss,
        draw_diffusion_inputs,
        drop_classes,
    )

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])
    torch.manual_seed(config["seed"])
    with config["vae_checkpoint"].as_directory() as d:
        vae = AutoencoderKL.from_pretrained(Path(d) / config["vae_subdir"]).to(device).eval()
    vae.requires_grad_(False)
    def fresh():
        if config.get("init_transformer"):
            with config["init_transformer"].as_directory() as d:
                return DiTTransformer2DModel.from_pretrained(Path(d) / "transformer")
        return DiTTransformer2DModel(**config["transformer_config"])

    transformer, opt_state, start, history = _resume(DiTTransformer2DModel, "transformer", fresh)
    if _finished(start, config["epochs"], history, rank):
        return
    scheduler = DDIMScheduler(**config["scheduler_config"])
    pipe = DiTPipeline(transformer=transformer.to(device), vae=vae, scheduler=scheduler)
    spec = ModelSpec.from_pipeline(pipe)
    alphas = alphas_cumprod_from_config(dict(scheduler.config)).to(device)
    model = ray.train.torch.prepare_model(transformer)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    if opt_state:
        opt.load_state_dict(opt_state)
    shard = ray.train.get_dataset_shard("train")
    g = torch.Generator(device=device).manual_seed(config["seed"] * 1000 + rank)
    out = OutputDir(config["output"]) if rank == 0 else None
    for epoch in range(start, config["epochs"]):
        t, n, total, skipped = time.perf_counter(), 0, 0.0, 0
        model.train()
        for x, y, bad in _batches(shard, config["batch_size"], device):
            skipped += bad
            if len(x) == 0:
                continue
            with torch.no_grad():
                z0 = encode(pipe, x, mode="sample", generator=g)  # (B, c, h, w)
            tt, noise = draw_diffusion_inputs(z0, spec.num_train_timesteps, g)
            yy = drop_classes(y, config["class_dropout"], spec.null_class, g)
            loss = diffusion_loss(model, z0, yy, tt, noise, alphas, spec.latent_channels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
            total += loss.item() * len(x)
        metrics = {"stage": "dit", "epoch": epoch, "loss": total / max(n, 1), "images_per_s": n / (time.perf_counter() - t), "skipped": skipped}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                transformer.eval()
                labels = torch.arange(min(spec.num_classes, 10), device=device).repeat_interleave(8)
                imgs = decode(pipe, sample_from_noise(pipe, labels, steps=config["sample_steps"], guidance=4.0,
                                                      generator=torch.Generator(device=device).manual_seed(1)))
                out.write_bytes(f"samples/epoch-{epoch + 1:04d}.png", _grid_png(imgs, 8))
                history.append(metrics)
                _save_epoch(Path(d), transformer, "transformer", opt, epoch, history)
                print(f"[dit] epoch {epoch + 1}/{config['epochs']}: loss {metrics['loss']:.5f}, "
                      f"{metrics['images_per_s']:.0f} images/s" + (f", {skipped} skipped" if skipped else ""), flush=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def _grid_png(images, nrow: int) -> bytes:
    import io

    from torchvision.utils import save_image

    buf = io.BytesIO()
    save_image(images.float().cpu(), buf, format="png", nrow=nrow)
    return buf.getvalue()


# -- the driver ----------------------------------------------------------------------------------

def _trainer(loop, config: dict, cfg: FinetuneConfig, name: str, ds, use_gpu: bool):
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = cfg.storage_path or str(Path("~/ray_results").expanduser())
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
    )


def run(cfg: FinetuneConfig) -> dict:
    """Train; returns {"output": pipeline location, "history": per-epoch metrics}."""
    import ray
    import ray.train
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
    )

    from d3hr_ray.io.fs import OutputDir
    from d3hr_ray.models.build import dit_sizes, scheduler_config, vae_config
    from d3hr_ray.models.loading import class_names, load_pipeline
    from d3hr_ray.pipeline.actors import preprocess_batch
    from d3hr_ray.pipeline.sources import open_source

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0

    init = load_pipeline(cfg.init) if cfg.init else None
    init_names = class_names(init) if init is not None else None
    src = open_source(cfg.data, model_names=init_names,
                      num_model_classes=init.transformer.config.num_embeds_ada_norm if init is not None else None)
    num_classes = init.transformer.config.num_embeds_ada_norm if init is not None else len(src.names)
    names = [src.names.get(i, init_names[i] if init_names else str(i)) for i in range(num_classes)]

    vcfg = dict(init.vae.config) if init is not None and not cfg.train_vae else vae_config(cfg.vae)
    vcfg = {k: v for k, v in vcfg.items() if not k.startswith("_")}
    factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
    if init is not None:
        resolution = init.transformer.config.sample_size * factor
        if cfg.resolution and cfg.resolution != resolution:
            raise ConfigError(f"--resolution {cfg.resolution} differs from the --init model's {resolution}")
    else:
        resolution = cfg.resolution or vcfg["sample_size"]
    vcfg["sample_size"] = resolution
    ds = src.dataset.map_batches(preprocess_batch, fn_kwargs={"resolution": resolution}, batch_size=cfg.batch_size, batch_format="numpy")
    ds = ds.map_batches(_training_rows, batch_format="numpy")

    history = []
    common = dict(seed=cfg.seed, batch_size=cfg.batch_size, output=cfg.output, torch_threads=cfg.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.train_vae:
            res = _trainer(vae_loop, dict(common, vae_config=vcfg, lr=cfg.vae_lr, epochs=cfg.vae_epochs, kl_weight=cfg.kl_weight),
                           cfg, f"{cfg.name}-vae", ds, use_gpu).fit()
            history += _metrics(res)
            vae_ckpt, vae_subdir = res.checkpoint, "vae"
        else:
            init.vae.save_pretrained(Path(tmp) / "vae")
            vae_ckpt, vae_subdir = ray.train.Checkpoint.from_directory(tmp), "vae"
        if init is not None:
            tcfg = {k: v for k, v in dict(init.transformer.config).items() if not k.startswith("_")}
            init.transformer.save_pretrained(Path(tmp) / "transformer")
            init_ckpt = ray.train.Checkpoint.from_directory(tmp)
            scfg = {k: v for k, v in dict(init.scheduler.config).items() if not k.startswith("_")}
        else:
            shape = dit_sizes()[cfg.dit]
            c = vcfg["latent_channels"]
            tcfg = dict(in_channels=c, out_channels=2 * c, sample_size=resolution // factor, num_embeds_ada_norm=num_classes, **shape)
            init_ckpt = None
            scfg = {k: v for k, v in scheduler_config().items() if not k.startswith("_")}
        res = _trainer(
            dit_loop,
            dict(common, vae_checkpoint=vae_ckpt, vae_subdir=vae_subdir, transformer_config=tcfg, init_transformer=init_ckpt,
                 scheduler_config=scfg, lr=cfg.lr, epochs=cfg.epochs, class_dropout=cfg.class_dropout, sample_steps=cfg.sample_steps),
            cfg, cfg.name, ds, use_gpu,
        ).fit()
        history += _metrics(res)
        # Assemble the pipeline folder from the last checkpoints.
        with vae_ckpt.as_directory() as d:
            vae = AutoencoderKL.from_pretrained(Path(d) / vae_subdir)
        with res.checkpoint.as_directory() as d:
            transformer = DiTTransformer2DModel.from_pretrained(Path(d) / "transformer")
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**scfg), id2label=dict(enumerate(names)))
        pipe.register_to_config(id2label={str(i): n for i, n in enumerate(names)})
        folder = Path(tmp) / "pipeline"
        pipe.save_pretrained(folder)
        out = OutputDir(cfg.output)
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                out.write_bytes(f.relative_to(folder).as_posix(), f.read_bytes())
        out.write_bytes("training.json", json.dumps({"config": cfg.to_dict(), "class_names": names, "history": history}, indent=2).encode())
    return {"output": out.uri, "history": history}


def _metrics(result) -> list[dict]:
    """Every epoch's metrics of a run, resumed runs included, oldest first (kept in the checkpoints)."""
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / "state.json").read_text())["history"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(prog="python -m d3hr_ray.finetune", description=__doc__, cls=FinetuneConfig)
    try:
        cfg = config_from_args(argv, parser)
        out = run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    last = out["history"][-1] if out["history"] else {}
    print(f"trained: last epoch loss {last.get('loss', float('nan')):.5f}")
    print(f"output: {out['output']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    sys.exit(main())
