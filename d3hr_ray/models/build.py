"""Random-weight DiT pipelines built from diffusers configs, for tests and benchmarks.

No torch at import (the job configs read the size names). Nothing is downloaded: the transformer shapes
(`configs/dit_sizes.json`), the VAEs (`configs/vae_*.json`)
and DiT's DDIM scheduler (`configs/dit_scheduler_ddim.json`) ship with the package. A DiT-XL/2-shaped
pipeline (`build_pipeline(dit="XL/2", vae="sd", resolution=256, num_classes=1000)`) has the published
model's FLOPs with random weights: right for throughput work, meaningless for images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and diffusers only for the annotations: the configs import this module without torch
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

__all__ = [
    "VAE_CONFIGS",
    "assemble_pipeline",
    "build_pipeline",
    "config_kwargs",
    "dit_sizes",
    "pipeline_configs",
    "scheduler_config",
    "vae_config",
]

# Registry: VAE name -> config file.
VAE_CONFIGS = {"tiny": "vae_tiny.json", "small": "vae_small.json", "sd": "vae_sd.json"}


@cache
def _config(name: str) -> dict:
    text = resources.files("d3hr_ray.models").joinpath("configs", name).read_text()
    return {k: v for k, v in json.loads(text).items() if k != "_comment"}


def config_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as constructor kwargs: without its bookkeeping keys ("_class_name", "_diffusers_version")."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def dit_sizes() -> dict[str, dict]:
    """Registry: DiT size name ("tiny", "S/2", "B/2", "L/2", "XL/2") -> transformer shape kwargs."""
    return dict(_config("dit_sizes.json"))


def vae_config(name: str) -> dict:
    """An AutoencoderKL config by name (see `VAE_CONFIGS`)."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE {name!r}; expected one of {sorted(VAE_CONFIGS)}")
    return dict(_config(VAE_CONFIGS[name]))


def scheduler_config() -> dict:
    """DiT's DDIM scheduler config (linear betas, T = 1000)."""
    return dict(_config("dit_scheduler_ddim.json"))


def assemble_pipeline(
    transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler: DDIMScheduler, class_names: Sequence[str]
) -> DiTPipeline:
    """A `DiTPipeline` of these modules whose id2label (class id -> name) is saved with it.

    Args:
        transformer, vae, scheduler: a DiTTransformer2DModel, an AutoencoderKL, a DDIMScheduler.
        class_names: C names, the name of class i at position i.
    Returns:
        diffusers.DiTPipeline; `save_pretrained` writes id2label into model_index.json (as JSON, with
        string keys: `load_pipeline` hands them back to diffusers as ints).
    """
    from diffusers import DiTPipeline  # no diffusers at import: the job configs read this module's size names

    id2label = {i: str(n) for i, n in enumerate(class_names)}
    pipe = DiTPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,  # type: ignore[arg-type]  # diffusers annotates it with an enum of scheduler names
        id2label=id2label,
    )
    # DiTPipeline.__init__ keeps only the reverse map (`labels`); registering id2label puts it in the
    # config that save_pretrained writes and from_pretrained hands back to __init__.
    pipe.register_to_config(id2label=id2label)
    return pipe


def pipeline_configs(
    *, dit: str, vae: str, num_classes: int, resolution: int | None = None, learned_sigma: bool = True
) -> dict[str, dict]:
    """The transformer, VAE and scheduler configs of `build_pipeline`'s pipeline, without building it (so a plan
    can count the FLOPs of DiT-XL/2 from its shape alone).

    Returns:
        {"transformer": DiTTransformer2DModel kwargs, "vae": AutoencoderKL kwargs, "scheduler": DDIMScheduler kwargs}.
    """
    sizes = dit_sizes()
    if dit not in sizes:
        raise ValueError(f"unknown DiT size {dit!r}; expected one of {sorted(sizes)}")
    vcfg = vae_config(vae)
    vcfg.pop("_class_name", None)
    factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
    res = int(resolution or vcfg["sample_size"])
    shape = sizes[dit]
    if res % (factor * shape["patch_size"]):
        raise ValueError(
            f"resolution {res} must be divisible by {factor * shape['patch_size']} (VAE factor x patch size)"
        )
    vcfg["sample_size"] = res
    c = vcfg["latent_channels"]
    transformer = {
        "in_channels": c,
        "out_channels": 2 * c if learned_sigma else c,
        "sample_size": res // factor,
        "num_embeds_ada_norm": num_classes,
        **shape,
    }
    scfg = scheduler_config()
    scfg.pop("_class_name", None)
    return {"transformer": transformer, "vae": vcfg, "scheduler": scfg}


def build_pipeline(
    *,
    dit: str = "tiny",
    vae: str = "tiny",
    num_classes: int = 10,
    resolution: int | None = None,
    class_names: Sequence[str] | None = None,
    learned_sigma: bool = True,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> DiTPipeline:
    """A `DiTPipeline` with random weights.

    Args:
        dit: transformer size, a key of `dit_sizes()`.
        vae: VAE config name, a key of `VAE_CONFIGS`.
        num_classes: C; the class embedding gets C + 1 rows (row C is the CFG null class).
        resolution: image side R (default: the VAE config's `sample_size`); the DiT's latent side is
            R / f with f the VAE's downsampling factor.
        class_names: C names stored as the pipeline's id2label (default "class_0", ...).
        learned_sigma: out_channels = 2 * latent channels, as DiT (else epsilon only).
        seed: weight initialisation seed.
        dtype: parameter dtype (a torch.dtype; default float32).
    Returns:
        diffusers.DiTPipeline on the CPU.
    """
    # No torch or diffusers at import: the job configs read this module's size names.
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    cfgs = pipeline_configs(
        dit=dit, vae=vae, num_classes=num_classes, resolution=resolution, learned_sigma=learned_sigma
    )
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(**cfgs["transformer"])
    autoencoder = AutoencoderKL(**cfgs["vae"])
    scheduler = DDIMScheduler(**cfgs["scheduler"])
    transformer.eval(), autoencoder.eval()  # inference mode: no class dropout in the label embedding
    if dtype is not None and dtype != torch.float32:
        transformer, autoencoder = transformer.to(dtype), autoencoder.to(dtype)
    return assemble_pipeline(transformer, autoencoder, scheduler, names)
