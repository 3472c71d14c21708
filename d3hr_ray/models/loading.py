"""`load_pipeline`: a diffusers `DiTPipeline` from a local folder, an s3:// prefix or a hub id.

Nothing here downloads from a model hub unless the source is a hub id and the hub is reachable;
a local folder in diffusers' layout and an s3:// prefix (cached by ETag) both work offline.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTPipeline
from diffusers.utils import is_accelerate_available
from diffusers.utils import logging as diffusers_logging

from d3hr_ray.models.build import pipeline_configs
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.storage.s3 import explained, is_s3, mirror_prefix, parse_s3_url, s3_client

__all__ = [
    "BUILTIN_MODELS",
    "BUNDLED_SHAPES",
    "ModelInfo",
    "ModelSourceError",
    "bundled_model_info",
    "class_names",
    "load_pipeline",
    "loader_options",
    "model_info",
]


def _bundled(name: str) -> DiTPipeline:
    """A pipeline shipped inside the package (d3hr_ray/models/bundled/<name>/, DiTPipeline layout)."""
    folder = resources.files("d3hr_ray.models").joinpath("bundled", name)
    if not folder.joinpath("model_index.json").is_file():
        raise ModelSourceError(f"the bundled model {name!r} is missing from this installation ({folder})")
    with resources.as_file(folder) as path:
        return _from_pretrained(str(path))


def _builtin_digits() -> DiTPipeline:
    """The embedded default's model: a DiT-mini + small VAE trained on scikit-learn's digits at 16 px
    with `python -m d3hr_ray.finetune` (the command is in docs/models.md)."""
    return _bundled("digits")


# Registry: "builtin:<name>" model sources.
BUILTIN_MODELS = {"digits": _builtin_digits}
_BUILTIN = "builtin:"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LAYOUT = "folder in DiTPipeline layout (model_index.json, transformer/, vae/, scheduler/)"
_OFFLINE_HINT = f"a local {_LAYOUT} or s3://bucket/prefix holding one works offline"


class ModelSourceError(FileNotFoundError):
    """The model source could not be resolved to a pipeline; the message says why and what works."""


def loader_options() -> dict:
    """Keyword arguments for every diffusers `from_pretrained` of this package (pipelines and modules).

    diffusers prefers accelerate's low-memory loader and, when accelerate is not installed, falls back
    to its plain loader with a multi-line "pip install accelerate" warning, once per model per
    process (every Ray actor and worker). Measured on the bundled digits model and on a DiT-XL/2-shaped
    pipeline (3.1 GB), the plain loader is as fast and as lean on these loads (docs/models.md), so
    accelerate is not a dependency: the plain loader is asked for explicitly, which is what diffusers
    would pick anyway, without the warning. Where accelerate is installed it is used.
    """
    return {"low_cpu_mem_usage": is_accelerate_available()}


def _from_pretrained(location: str | os.PathLike, **kwargs: Any) -> DiTPipeline:
    """`DiTPipeline.from_pretrained` of a local folder, id2label handed over as declared: dict[int, str].

    model_index.json is JSON, so its id2label keys are strings; diffusers type-checks the value it
    reads against `DiTPipeline.__init__`'s annotation and warns ("Expected types for id2label") on
    every load. The keys are turned back into ints here, once, for every pipeline this package loads.
    """
    kwargs = {**loader_options(), **kwargs}
    id2label = json.loads((Path(location) / "model_index.json").read_text()).get("id2label")
    if id2label:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
    # No "Loading pipeline components" bar: every model actor loads once, and a bar per actor buries the job's
    # own progress lines; the caller's setting is restored after.
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiTPipeline.from_pretrained(location, **kwargs)
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    if id2label:
        pipe.register_to_config(id2label=kwargs["id2label"])  # from_pretrained does not; a re-save keeps the names
    return pipe


def _from_folder(folder: Path, dtype: torch.dtype) -> DiTPipeline:
    if not (folder / "model_index.json").is_file():
        raise ModelSourceError(f"model folder {folder} has no model_index.json; expected a {_LAYOUT}")
    return _from_pretrained(str(folder), dtype=dtype)


def load_pipeline(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> DiTPipeline:
    """Load a class-conditional DiT pipeline.

    Args:
        source: a local folder saved by `save_pretrained`; an `s3://bucket/prefix` holding such a
            folder (downloaded into `cache_dir`, default $D3HR_CACHE_DIR or ~/.cache/d3hr_ray, under a
            name keyed by the objects' ETags, so a changed model is fetched again); or a Hugging Face
            hub id such as "facebook/DiT-XL-2-256" (only where the hub is reachable).
        device: where to put the modules.
        dtype: parameter dtype (torch.bfloat16 on GPUs, float32 on the CPU).
    Returns:
        diffusers.DiTPipeline, validated by `ModelSpec.from_pipeline` (class-conditional, epsilon
        prediction, VAE and transformer channels that agree).
    Raises:
        ModelSourceError: the source does not exist, is not a pipeline, or the hub is unreachable.
    """
    src = os.fspath(source)
    if src.startswith(_BUILTIN):
        name = src[len(_BUILTIN) :]
        if name not in BUILTIN_MODELS:
            raise ModelSourceError(
                f"unknown built-in model {src!r}; built-in models: {', '.join(_BUILTIN + k for k in BUILTIN_MODELS)}"
            )
        pipe = BUILTIN_MODELS[name]()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif is_s3(src):
        try:
            with explained(src):
                folder = mirror_prefix(src, cache_dir)
            pipe = _from_folder(folder, dtype)
        except FileNotFoundError as e:
            raise ModelSourceError(f"cannot load model from {src}: {e}") from e
    elif Path(src).exists():
        pipe = _from_folder(Path(src), dtype)
    elif _HUB_ID.match(src) and not src.startswith((".", "/")):
        try:
            # Download (or find in the cache) first, then load the local copy: `_from_pretrained` reads
            # model_index.json before loading, and a hub read of that one file retries for ~20 s offline.
            pipe = _from_pretrained(DiTPipeline.download(src), dtype=dtype)
        except Exception as e:  # hub errors come in many classes (offline, DNS, 404, gated)
            raise ModelSourceError(
                f"cannot load model {src!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); "
                f"{_OFFLINE_HINT}"
            ) from e
    else:
        raise ModelSourceError(
            f"model source {src!r} is not an existing folder, an s3:// URL or a hub id; {_OFFLINE_HINT}"
        )
    ModelSpec.from_pipeline(pipe)  # fail now, with a clear message, on a model D3HR cannot use
    return pipe.to(device)


def class_names(pipe: DiTPipeline) -> list[str] | None:
    """The pipeline's id2label names in class-id order, or None if it has none."""
    return [n for n, _ in sorted(pipe.labels.items(), key=lambda kv: kv[1])] or None


# Hub models whose shape ships with the package (models/configs): a dry run plans them offline from these
# configs when the hub cannot be reached. id -> (DiT size, VAE config, resolution); both have 1,000 classes.
BUNDLED_SHAPES = {"facebook/DiT-XL-2-256": ("XL/2", "sd", 256), "facebook/DiT-XL-2-512": ("XL/2", "sd", 512)}


@dataclass(frozen=True)
class ModelInfo:
    """What a driver needs to know about a model without loading its weights."""

    spec: ModelSpec
    class_names: list[str] | None  # the pipeline's id2label in id order, if it has one
    configs: dict | None = None  # {"transformer": dict, "vae": dict}: the configs (for the --dry-run plan)


def _read_json(read: Callable[[str], str], rel: str) -> dict:
    try:
        return json.loads(read(rel))
    except FileNotFoundError:
        raise ModelSourceError(f"model has no {rel}; expected a {_LAYOUT}") from None


def bundled_model_info(hub_id: str) -> ModelInfo:
    """The ModelInfo of a hub model of `BUNDLED_SHAPES` from the package's configs alone (no network, no weights;
    no class names: the id2label is not bundled)."""
    dit, vae, resolution = BUNDLED_SHAPES[hub_id]
    cfgs = pipeline_configs(dit=dit, vae=vae, num_classes=1000, resolution=resolution)
    spec = ModelSpec.from_configs(cfgs["transformer"], cfgs["vae"], cfgs["scheduler"])
    return ModelInfo(spec, None, {"transformer": cfgs["transformer"], "vae": cfgs["vae"]})


def model_info(source: str | os.PathLike) -> ModelInfo:
    """The ModelSpec and class names of a model source, from its config files only."""
    src = os.fspath(source)
    if is_s3(src):
        bucket, prefix = parse_s3_url(src)
        client = s3_client()

        def read(rel: str) -> str:
            with explained(src):
                try:
                    key = f"{prefix}/{rel}" if prefix else rel
                    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
                except client.exceptions.NoSuchKey:
                    raise FileNotFoundError(rel) from None

    elif Path(src).is_dir():

        def read(rel: str) -> str:
            return (Path(src) / rel).read_text()

    else:
        # builtin:, a hub id or a missing path: load_pipeline loads it or says how to fix the source.
        pipe = load_pipeline(src)
        configs = {"transformer": dict(pipe.transformer.config), "vae": dict(pipe.vae.config)}
        return ModelInfo(ModelSpec.from_pipeline(pipe), class_names(pipe), configs)
    index = _read_json(read, "model_index.json")
    configs = {"transformer": _read_json(read, "transformer/config.json"), "vae": _read_json(read, "vae/config.json")}
    spec = ModelSpec.from_configs(
        configs["transformer"], configs["vae"], _read_json(read, "scheduler/scheduler_config.json")
    )
    id2label = index.get("id2label")
    names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
    return ModelInfo(spec, names, configs)
