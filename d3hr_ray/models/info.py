"""What a job's driver knows of a model without loading it: its ModelSpec and class names, from the config files.

A distill driver plans, lists and checks a run from these; only the model actors load weights (models/loading.py,
which imports diffusers: 4-6 s of CPU and about 250 MB a process, measured in docs/performance.md). No diffusers
here, and no weights read: a hub id's four config files are fetched into the Hugging Face cache, not the model.

    model_info(source)         -> ModelInfo    builtin:<name>, a folder, s3://bucket/prefix, a hub id (configs only)
    bundled_model_info(hub_id) -> ModelInfo    a hub model of BUNDLED_SHAPES from the package's configs (dry runs)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from d3hr_ray.models.build import pipeline_configs
from d3hr_ray.models.sources import ModelSourceError, builtin_folder, hub_error, is_hub_id, missing_file, unknown_source
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.storage.s3 import explained, is_s3, parse_s3_url, s3_client

__all__ = ["BUNDLED_SHAPES", "ModelInfo", "bundled_model_info", "model_info"]

# Hub models whose shape ships with the package (models/configs): a dry run plans them offline from these
# configs when the hub cannot be reached. id -> (DiT size, VAE config, resolution); both have 1,000 classes.
BUNDLED_SHAPES = {"facebook/DiT-XL-2-256": ("XL/2", "sd", 256), "facebook/DiT-XL-2-512": ("XL/2", "sd", 512)}


@dataclass(frozen=True)
class ModelInfo:
    """What a driver needs to know about a model without loading its weights."""

    spec: ModelSpec
    class_names: list[str] | None  # the pipeline's id2label in id order, if it has one
    configs: dict | None = None  # {"transformer": dict, "vae": dict}: the configs (for the --dry-run plan)


def _hub_file(repo: str, rel: str) -> str:
    """The local path of one file of a hub model: from the Hugging Face cache, downloaded into it when missing (the
    config files only, a few kB, never the weights: the model actors download those)."""
    try:
        return hf_hub_download(repo, rel)
    except LocalEntryNotFoundError as e:  # offline, or the hub unreachable, and not in the cache
        raise hub_error(repo, e) from e
    except EntryNotFoundError:  # the repository has no such file
        raise FileNotFoundError(rel) from None
    except Exception as e:  # the hub's other errors (DNS, 404 repository, gated, ...)
        raise hub_error(repo, e) from e


def _read_json(read: Callable[[str], str], rel: str, src: str) -> dict:
    try:
        return json.loads(read(rel))
    except ModelSourceError:  # already says what is wrong (a FileNotFoundError too): the hub's refusal
        raise
    except FileNotFoundError:
        raise missing_file(f"model {src}", rel) from None


def bundled_model_info(hub_id: str) -> ModelInfo:
    """The ModelInfo of a hub model of `BUNDLED_SHAPES` from the package's configs alone (no network, no weights;
    no class names: the id2label is not bundled)."""
    dit, vae, resolution = BUNDLED_SHAPES[hub_id]
    cfgs = pipeline_configs(dit=dit, vae=vae, num_classes=1000, resolution=resolution)
    spec = ModelSpec.from_configs(cfgs["transformer"], cfgs["vae"], cfgs["scheduler"])
    return ModelInfo(spec, None, {"transformer": cfgs["transformer"], "vae": cfgs["vae"]})


def model_info(source: str | os.PathLike) -> ModelInfo:
    """The ModelSpec and class names of a model source, from its config files only.

    Raises:
        ModelSourceError: an unknown built-in, a folder or prefix without the layout's files, or a source that is
            none of builtin:, a folder, s3:// and a hub id (the message says what works).
    """
    src = os.fspath(source)
    folder = builtin_folder(src)
    read: Callable[[str], str]
    if folder is not None:
        bundled = resources.files("d3hr_ray.models").joinpath("bundled", folder)

        def read(rel: str) -> str:
            return bundled.joinpath(rel).read_text()

    elif is_s3(src):
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

    elif is_hub_id(src) and not Path(src).exists():

        def read(rel: str) -> str:
            return Path(_hub_file(src, rel)).read_text()

    elif Path(src).exists():
        raise missing_file(f"model folder {src}", "model_index.json")
    else:
        raise unknown_source(src)
    index = _read_json(read, "model_index.json", src)
    configs = {name: _read_json(read, f"{name}/config.json", src) for name in ("transformer", "vae")}
    spec = ModelSpec.from_configs(
        configs["transformer"], configs["vae"], _read_json(read, "scheduler/scheduler_config.json", src)
    )
    id2label = index.get("id2label")
    names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
    return ModelInfo(spec, names, configs)
