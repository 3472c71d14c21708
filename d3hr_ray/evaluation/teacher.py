"""Classifier weights on disk: this project's teacher folders, and users' torchvision-layout state dicts.

A teacher folder (written by `train_teacher`, local or s3://) holds

    model.safetensors   the state dict
    teacher.json        {arch, num_classes, resolution, mean, std, class_names, test_top1, ...}

Anything else is read as a state-dict file (.pt / .pth / .bin via `torch.load(weights_only=True)`, or
.safetensors) of a registry architecture named by --teacher-arch, e.g. torchvision's
resnet18-f37072fd.pth for ImageNet; a wrapping {"state_dict": ...} or {"model": ...} and DDP's
"module." prefixes are unwrapped.

`torchvision:<model>[:<weights>]` (torchvision:resnet18:IMAGENET1K_V1; the model's DEFAULT weights when
none is named) is torchvision's weights API: the file is read from torch.hub's cache,
`<TORCH_HOME>/hub/checkpoints/<file>` (`torchvision_checkpoint`), and downloaded there only when missing;
classes, resolution and normalisation come from the weights' metadata.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import posixpath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
from pyarrow import fs as pafs
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from d3hr_ray.storage.fs import OutputDir, read_bytes, resolve
from d3hr_ray.storage.s3 import explained
from d3hr_ray.training.protocol import IMAGENET_MEAN, IMAGENET_STD
from d3hr_ray.training.students import build_student

if TYPE_CHECKING:  # torchvision's model registry imports torch._dynamo (2.3 s a process): only torchvision: teachers
    from torchvision.models import WeightsEnum

__all__ = [
    "TORCHVISION",
    "TeacherError",
    "features_and_logits",
    "load_teacher",
    "save_teacher",
    "teacher_meta",
    "torchvision_checkpoint",
    "torchvision_weights",
]

# --teacher torchvision:<model>[:<weights>]: torchvision's pretrained weights, by name.
TORCHVISION = "torchvision:"
# The torchvision models a teacher can be: the student registry's (workers rebuild a teacher by its name).
_TORCHVISION_ARCHS = ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_b0", "vgg11")


class TeacherError(ValueError):
    """A teacher that cannot be used; the message says why."""


def save_teacher(out: OutputDir, model: torch.nn.Module, meta: dict) -> None:
    """Write model.safetensors and teacher.json (meta needs arch, num_classes, resolution)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out.write_bytes("model.safetensors", save_safetensors(state))
    out.write_bytes("teacher.json", json.dumps(meta, indent=2).encode())


def _is_folder(uri: str) -> bool:
    with explained(uri):
        fs, path = resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.Directory


def torchvision_weights(spec: str) -> tuple[str, WeightsEnum]:
    """`torchvision:<model>[:<weights>]` -> (architecture name, torchvision WeightsEnum member); TeacherError
    naming the choices for an unknown model or weights."""
    model, _, weights = spec.removeprefix(TORCHVISION).partition(":")
    if model not in _TORCHVISION_ARCHS:
        raise TeacherError(f"--teacher {spec}: the model must be one of {', '.join(_TORCHVISION_ARCHS)}")
    from torchvision.models import get_model_weights  # optional: torchvision: teachers only (see the imports)

    enum = get_model_weights(model)
    if not weights:
        return model, enum.DEFAULT
    if weights not in enum.__members__:
        raise TeacherError(f"--teacher {spec}: {model}'s weights are {', '.join(enum.__members__)}")
    return model, enum[weights]


def torchvision_checkpoint(weights: WeightsEnum) -> str:
    """Where torch.hub keeps a torchvision weights file: <torch.hub.get_dir()>/checkpoints/<the URL's file name>
    (torch.hub.get_dir() is $TORCH_HOME/hub, ~/.cache/torch/hub by default)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", posixpath.basename(urlparse(weights.url).path))


def _torchvision_meta(spec: str) -> dict:
    arch, weights = torchvision_weights(spec)
    preset = weights.transforms()  # ImageClassification: crop_size, mean, std
    return {
        "arch": arch,
        "num_classes": len(weights.meta["categories"]),
        "class_names": list(weights.meta["categories"]),
        "resolution": int(preset.crop_size[0]),
        "mean": list(preset.mean),
        "std": list(preset.std),
        "weights": str(weights),
    }


def _torchvision_state(spec: str) -> dict:
    """The state dict from torch.hub's cache, or downloaded there; TeacherError in one line naming the file and
    where to put it when it is missing and cannot be fetched."""
    _, weights = torchvision_weights(spec)
    path = torchvision_checkpoint(weights)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return _state_dict(path, f.read())
    try:
        return weights.get_state_dict(progress=False)
    except OSError as e:  # URLError, no route, no DNS: offline
        raise TeacherError(
            f"--teacher {spec}: {path} is missing and could not be downloaded ({type(e).__name__}); download "
            f"{weights.url} and put it there (the folder is torch.hub's: $TORCH_HOME/hub/checkpoints)"
        ) from None


def teacher_meta(uri: str) -> dict | None:
    """teacher.json of a teacher folder, or a torchvision teacher's metadata; None for a bare state-dict file."""
    if uri.startswith(TORCHVISION):
        return _torchvision_meta(uri)
    if not _is_folder(uri):
        return None
    try:
        return json.loads(read_bytes(uri.rstrip("/") + "/teacher.json"))
    except FileNotFoundError:
        raise TeacherError(
            f"--teacher {uri}: a folder without teacher.json (write one with train_teacher, or pass the weights file)"
        ) from None


def _state_dict(uri: str, data: bytes) -> dict:
    if uri.endswith(".safetensors"):
        return load_safetensors(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise TeacherError(f"--teacher {uri}: not a torch state dict ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TeacherError(f"--teacher {uri}: holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_teacher(
    uri: str, *, arch: str | None = None, num_classes: int | None = None, resolution: int | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode with frozen parameters, meta) from a teacher folder, a state-dict file or
    `torchvision:<model>[:<weights>]`.

    For a bare file, `arch` and `num_classes` are required; meta then gets ImageNet's mean and std.
    Raises TeacherError when the weights do not fit the architecture (naming the first mismatches).
    """
    meta = teacher_meta(uri)
    if meta is None:  # a bare weights file
        if arch is None or num_classes is None:
            raise TeacherError(
                f"--teacher {uri} is a weights file: also pass --teacher-arch (and the data's classes decide "
                "num_classes)"
            )
        state = _state_dict(uri, read_bytes(uri))
        meta = {
            "arch": arch,
            "num_classes": num_classes,
            "resolution": resolution,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        }
    elif uri.startswith(TORCHVISION):
        state = _torchvision_state(uri)
    else:
        state = _state_dict("model.safetensors", read_bytes(uri.rstrip("/") + "/model.safetensors"))
    res = meta.get("resolution") or resolution or 224
    model = build_student(meta["arch"], meta["num_classes"], res)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        raise TeacherError(
            f"--teacher {uri}: weights do not fit {meta['arch']} with {meta['num_classes']} classes "
            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
        ) from None
    if missing or unexpected:
        raise TeacherError(
            f"--teacher {uri}: weights do not fit {meta['arch']} with {meta['num_classes']} classes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval().requires_grad_(False)
    return model, dict(meta, resolution=res)


def features_and_logits(
    teacher: torch.nn.Module, x: torch.Tensor, batch: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, R, R) normalised -> penultimate features (N, F) float32 and logits (N, K) of a ConvNet-style
    teacher (`features` then `classifier`), else of any module with a final Linear (its input is hooked)."""
    last = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats, logits = [], []
    grabbed: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch):
                grabbed.clear()
                logits.append(teacher(x[s : s + batch]).float())
                feats.append(grabbed[-1].float())
    finally:
        handle.remove()
    if not feats:
        return torch.zeros(0, last.in_features), torch.zeros(0, last.out_features)
    return torch.cat(feats), torch.cat(logits)
