"""Model sources by kind, before anything is read: `builtin:<name>`, an s3:// prefix, a folder, a hub id.

Shared by models/info.py (a model's configs, for drivers) and models/loading.py (its pipeline, for actors), so
both accept and refuse the same sources with the same messages.
"""

from __future__ import annotations

import re

__all__ = [
    "BUILTIN",
    "LAYOUT",
    "OFFLINE_HINT",
    "ModelSourceError",
    "builtin_folder",
    "hub_error",
    "is_hub_id",
    "missing_file",
    "unknown_source",
]

# "builtin:<name>" model sources -> their folder under d3hr_ray/models/bundled/ (DiTPipeline layout). digits: the
# embedded default's DiT-mini + small VAE, trained on scikit-learn's digits at 16 px (the command in docs/models.md).
BUILTIN = {"digits": "digits"}
_BUILTIN = "builtin:"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LAYOUT = "folder in DiTPipeline layout (model_index.json, transformer/, vae/, scheduler/)"
OFFLINE_HINT = f"a local {LAYOUT} or s3://bucket/prefix holding one works offline"


class ModelSourceError(FileNotFoundError):
    """The model source could not be resolved to a pipeline; the message says why and what works."""


def builtin_folder(source: str) -> str | None:
    """The bundled folder's name of a `builtin:<name>` source; None for any other source; ModelSourceError for an
    unknown name, listing the built-in models."""
    if not source.startswith(_BUILTIN):
        return None
    name = source[len(_BUILTIN) :]
    if name not in BUILTIN:
        raise ModelSourceError(
            f"unknown built-in model {source!r}; built-in models: {', '.join(_BUILTIN + k for k in BUILTIN)}"
        )
    return BUILTIN[name]


def is_hub_id(source: str) -> bool:
    """Shaped like a Hugging Face hub id ("owner/name"), not a relative or absolute path."""
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "/"))


def hub_error(source: str, error: Exception) -> ModelSourceError:
    """The one refusal of a hub id that could not be read (offline, DNS, 404, gated: the hub's errors come in many
    classes), naming the hub's error and what works offline."""
    first = (str(error).splitlines() or [""])[0][:200]
    return ModelSourceError(
        f"cannot load model {source!r} from the Hugging Face hub ({type(error).__name__}: {first}); {OFFLINE_HINT}"
    )


def missing_file(model: str, rel: str) -> ModelSourceError:
    """The refusal of a folder, prefix or hub model (`model` says which) that lacks one file of the layout."""
    return ModelSourceError(f"{model} has no {rel}; expected a {LAYOUT}")


def unknown_source(source: str) -> ModelSourceError:
    """The refusal of a source that is none of builtin:, s3://, an existing folder and a hub id."""
    return ModelSourceError(
        f"model source {source!r} is not an existing folder, an s3:// URL or a hub id; {OFFLINE_HINT}"
    )
