"""`load_pipeline`: a diffusers `DiTPipeline` from a local folder, an s3:// prefix or a hub id.

Nothing here downloads from a model hub unless the source is a hub id and the hub is reachable;
a local folder in diffusers' layout and an s3:// prefix (cached by ETag) both work offline.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTPipeline
from diffusers.utils import is_accelerate_available
from diffusers.utils import logging as diffusers_logging

from d3hr_ray.models.sources import ModelSourceError, builtin_folder, hub_error, is_hub_id, missing_file, unknown_source
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.storage.s3 import explained, is_s3, mirror_prefix

__all__ = ["ModelSourceError", "class_names", "load_pipeline", "loader_options"]


def _bundled(name: str) -> DiTPipeline:
    """A pipeline shipped inside the package (d3hr_ray/models/bundled/<name>/, DiTPipeline layout)."""
    folder = resources.files("d3hr_ray.models").joinpath("bundled", name)
    if not folder.joinpath("model_index.json").is_file():
        raise ModelSourceError(f"the bundled model {name!r} is missing from this installation ({folder})")
    with resources.as_file(folder) as path:
        return _from_pretrained(str(path))


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
        raise missing_file(f"model folder {folder}", "model_index.json")
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
    bundled = builtin_folder(src)
    if bundled is not None:
        pipe = _bundled(bundled)
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
    elif is_hub_id(src):
        try:
            # Download (or find in the cache) first, then load the local copy: `_from_pretrained` reads
            # model_index.json before loading, and a hub read of that one file retries for ~20 s offline.
            pipe = _from_pretrained(DiTPipeline.download(src), dtype=dtype)
        except Exception as e:  # hub errors come in many classes (offline, DNS, 404, gated)
            raise hub_error(src, e) from e
    else:
        raise unknown_source(src)
    ModelSpec.from_pipeline(pipe)  # fail now, with a clear message, on a model D3HR cannot use
    return pipe.to(device)


def class_names(pipe: DiTPipeline) -> list[str] | None:
    """The pipeline's id2label names in class-id order, or None if it has none."""
    return [n for n, _ in sorted(pipe.labels.items(), key=lambda kv: kv[1])] or None
