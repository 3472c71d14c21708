"""`python -m d3hr_ray.finetune`: train or fine-tune the class-conditional DiT that D3HR needs, on Ray Train.

    [--train-vae]  AutoencoderKL on the images (reconstruction + KL), for low-resolution data
    DiT            DDPM epsilon loss on VAE latents, uniform timesteps, 10% class dropout to the null class

Both run as `ray.train.torch.TorchTrainer` jobs: DDP over --num-workers workers (GPUs when the cluster
has them), the data streamed to each worker with `get_dataset_shard`, a checkpoint every epoch under
--storage-path/--name, --max-failures retries; rerunning the same command resumes from the last
checkpoint. The result is a complete DiTPipeline folder (transformer, vae, DDIM scheduler, id2label)
that `load_pipeline` and diffusers' `DiTPipeline.from_pretrained` load, plus samples/epoch-NNNN.png.

This module is the driver (config, datasets, assembling the pipeline); the worker loops are in
`d3hr_ray.training.finetune_loops`, the Ray Train plumbing in `d3hr_ray.training.harness`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d3hr_ray import tracking
from d3hr_ray.cli import main_for
from d3hr_ray.data.listing import CLASS_NAMES_HELP
from d3hr_ray.data.preprocess import preprocess_batch, training_rows
from d3hr_ray.data.sources import list_source, read_label_names
from d3hr_ray.flags import ConfigError, require, require_positive_ints
from d3hr_ray.models.build import VAE_CONFIGS, assemble_pipeline, config_kwargs, dit_sizes, scheduler_config, vae_config
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.training import harness
from d3hr_ray.workers.datasets import open_listing

if TYPE_CHECKING:
    from diffusers import DiTPipeline
    from ray.data import Dataset

__all__ = ["FinetuneConfig", "main", "run"]

_DIT_SIZES = ", ".join(dit_sizes())
_VAES = ", ".join(VAE_CONFIGS)


@dataclass(frozen=True)
class FinetuneConfig(harness.TrainRunFields):
    """Everything `python -m d3hr_ray.finetune` needs. Field docs are the flags' help texts."""

    data: str = field(
        default="digits", metadata={"help": "training images: ImageFolder, Parquet (local or s3://) or 'digits'"}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": CLASS_NAMES_HELP},
    )
    output: str = field(default="dit-output", metadata={"help": "where the DiTPipeline folder goes (local or s3://)"})
    init: str | None = field(
        default=None,
        metadata={"help": "fine-tune this pipeline (folder, s3://, hub id); its VAE is kept unless --train-vae"},
    )
    dit: str = field(default="mini", metadata={"help": f"DiT size when training from scratch: {_DIT_SIZES}"})
    vae: str = field(default="small", metadata={"help": f"VAE config for --train-vae: {_VAES}"})
    train_vae: bool = field(
        default=False,
        metadata={"help": "train a VAE on the images first (no pretrained one for low-resolution data here)"},
    )
    resolution: int | None = field(
        default=None, metadata={"help": "image side R (default: the --init model's, else the VAE config's sample_size)"}
    )
    epochs: int = field(default=100, metadata={"help": "DiT epochs"})
    vae_epochs: int = field(default=20, metadata={"help": "VAE epochs (with --train-vae)"})
    batch_size: int = field(default=128, metadata={"help": "images per worker per step"})
    lr: float = field(default=1e-4, metadata={"help": "DiT AdamW learning rate (DiT's own)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate"})
    kl_weight: float = field(default=1e-4, metadata={"help": "beta of the VAE's KL term"})
    class_dropout: float = field(default=0.1, metadata={"help": "probability of replacing a label by the null class"})
    name: str = field(
        default="d3hr-dit", metadata={"help": "run name; rerunning with the same name and storage resumes"}
    )
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps for the per-epoch sample grid"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, noise and dropout"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_ints(self, "epochs", "batch_size", "sample_steps", "vae_epochs")
        require(self, self.lr > 0 and self.vae_lr > 0, "lr", "and --vae-lr must be > 0")
        require(self, self.dit in dit_sizes(), "dit", f"must be one of {_DIT_SIZES}")
        require(self, self.vae in VAE_CONFIGS, "vae", f"must be one of {_VAES}")
        require(self, self.kl_weight >= 0, "kl_weight", "must be >= 0")
        require(self, 0 <= self.class_dropout < 1, "class_dropout", "must be in [0, 1)")
        require(
            self,
            self.init is not None or self.train_vae,
            "init",
            "or --train-vae is needed (a DiT trains on the latents of some VAE)",
        )
        if self.resolution is not None:
            require(self, self.resolution >= 1, "resolution", "must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the driver ----------------------------------------------------------------------------------


def run(cfg: FinetuneConfig) -> dict:
    """Train; returns {"output": pipeline location, "history": per-epoch metrics}."""
    harness.use_train_v2()  # before ray.train is imported
    # torch and diffusers here, not at the top: FinetuneConfig parses without them (tests/training/test_harness.py).
    from d3hr_ray.models.loading import class_names, load_pipeline

    init = load_pipeline(cfg.init) if cfg.init else None  # a wrong --init fails before Ray starts
    use_gpu = harness.start_ray(cfg.use_gpu)
    init_names = class_names(init) if init is not None else None
    src = open_listing(
        list_source(
            cfg.data,
            model_names=init_names,
            num_model_classes=init.transformer.config.num_embeds_ada_norm if init is not None else None,
            label_names=read_label_names(cfg.class_names),
        )
    )
    num_classes = init.transformer.config.num_embeds_ada_norm if init is not None else len(src.names)
    names = [src.names.get(i, init_names[i] if init_names else str(i)) for i in range(num_classes)]

    vcfg = config_kwargs(dict(init.vae.config) if init is not None and not cfg.train_vae else vae_config(cfg.vae))
    factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
    if init is not None:
        resolution = init.transformer.config.sample_size * factor
        if cfg.resolution and cfg.resolution != resolution:
            raise ConfigError(f"--resolution {cfg.resolution} differs from the --init model's {resolution}")
    else:
        resolution = cfg.resolution or vcfg["sample_size"]
    vcfg["sample_size"] = resolution
    ds = src.dataset.map_batches(
        partial(preprocess_batch, resolution=resolution), batch_size=cfg.batch_size, batch_format="numpy"
    )
    ds = ds.map_batches(training_rows, batch_format="numpy")
    datasets = {"train": ds}

    out = OutputDir(cfg.output)
    with tracking.tracked(
        cfg.mlflow, out, "d3hr_ray.finetune", cfg.name, cfg.to_dict(), experiment_flag=cfg.mlflow_experiment
    ) as mlflow_run:
        history = _train(cfg, mlflow_run, out, init, vcfg, factor, resolution, num_classes, names, datasets, use_gpu)
        tracking.log_artifact(mlflow_run, "training.json", out.read("training.json"))
        for grid in out.list("samples"):  # every epoch's sample grid (a rerun logs them again, unchanged)
            tracking.log_artifact(mlflow_run, grid, out.read(f"samples/{grid}"), folder="samples")
    return {"output": out.uri, "history": history}


def _train(
    cfg: FinetuneConfig,
    mlflow_run: tracking.MLflowRun | None,
    out: OutputDir,
    init: DiTPipeline | None,
    vcfg: dict[str, Any],
    factor: int,
    resolution: int,
    num_classes: int,
    names: list[str],
    datasets: dict[str, Dataset],
    use_gpu: bool,
) -> list[dict]:
    """The VAE run (--train-vae), the DiT run, then the pipeline folder and training.json in `out`; the history."""
    import ray.train  # reads RAY_TRAIN_V2_ENABLED when first imported: only after run()'s use_train_v2()

    # torch and diffusers here, not at the top: FinetuneConfig parses without them (tests/training/test_harness.py).
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    from d3hr_ray.models.loading import loader_options
    from d3hr_ray.training.finetune_loops import DiTLoopConfig, VAELoopConfig, dit_loop, vae_loop

    history = []
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.train_vae:
            vae_cfg = VAELoopConfig(
                vae_config=vcfg,
                epochs=cfg.vae_epochs,
                batch_size=cfg.batch_size,
                lr=cfg.vae_lr,
                kl_weight=cfg.kl_weight,
                seed=cfg.seed,
                torch_threads=cfg.torch_threads,
                tracking=mlflow_run,
            )
            vae_run = harness.fit(
                vae_loop, vae_cfg, datasets, harness.RunSpec.of(cfg, use_gpu=use_gpu, name=f"{cfg.name}-vae")
            )
            history += harness.checkpoint_state(vae_run)["history"]
            vae_ckpt, vae_subdir = harness.last_checkpoint(vae_run), "vae"
        elif init is not None:
            init.vae.save_pretrained(Path(tmp) / "vae")
            vae_ckpt, vae_subdir = ray.train.Checkpoint.from_directory(tmp), "vae"
        else:  # FinetuneConfig refuses this already
            raise ConfigError("--init or --train-vae is needed (a DiT trains on the latents of some VAE)")
        if init is not None:
            tcfg = config_kwargs(dict(init.transformer.config))
            init.transformer.save_pretrained(Path(tmp) / "transformer")
            init_ckpt = ray.train.Checkpoint.from_directory(tmp)
            scfg = config_kwargs(dict(init.scheduler.config))
        else:
            shape = dit_sizes()[cfg.dit]
            c = vcfg["latent_channels"]
            tcfg = dict(
                in_channels=c,
                out_channels=2 * c,
                sample_size=resolution // factor,
                num_embeds_ada_norm=num_classes,
                **shape,
            )
            init_ckpt = None
            scfg = config_kwargs(scheduler_config())
        dit_cfg = DiTLoopConfig(
            vae_checkpoint=vae_ckpt,
            vae_subdir=vae_subdir,
            transformer_config=tcfg,
            init_transformer=init_ckpt,
            scheduler_config=scfg,
            output=cfg.output,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            class_dropout=cfg.class_dropout,
            sample_steps=cfg.sample_steps,
            seed=cfg.seed,
            torch_threads=cfg.torch_threads,
            tracking=mlflow_run,
        )
        dit_run = harness.fit(dit_loop, dit_cfg, datasets, harness.RunSpec.of(cfg, use_gpu=use_gpu))
        history += harness.checkpoint_state(dit_run)["history"]
        # Assemble the pipeline folder from the last checkpoints.
        with vae_ckpt.as_directory() as d:
            vae = AutoencoderKL.from_pretrained(Path(d) / vae_subdir, **loader_options())
        with harness.last_checkpoint(dit_run).as_directory() as d:
            transformer = DiTTransformer2DModel.from_pretrained(Path(d) / "transformer", **loader_options())
        pipe = assemble_pipeline(transformer, vae, DDIMScheduler(**scfg), names)
        folder = Path(tmp) / "pipeline"
        pipe.save_pretrained(folder)
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                out.write_bytes(f.relative_to(folder).as_posix(), f.read_bytes())
        out.write_bytes(
            "training.json",
            json.dumps({"config": cfg.to_dict(), "class_names": names, "history": history}, indent=2).encode(),
        )
    return history


def _report(cfg: FinetuneConfig, out: dict) -> int:
    last = out["history"][-1] if out["history"] else {}
    print(f"trained: last epoch loss {last.get('loss', float('nan')):.5f}")
    print(f"output: {out['output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    harness.use_train_v2()  # before anything imports ray.train
    return main_for(
        argv, cls=FinetuneConfig, run=run, report=_report, prog="python -m d3hr_ray.finetune", description=__doc__
    )


if __name__ == "__main__":
    raise SystemExit(main())
