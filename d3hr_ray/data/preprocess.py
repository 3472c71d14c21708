"""Images to model inputs, D3HR stage 1's preprocessing, with a reason for every image refused.

    decode -> RGB -> resize the shorter side to R (bicubic, antialiased) -> centre crop R x R -> [-1, 1]

Pure numpy and PIL (no torch, no Ray): the jobs' Ray Data tasks call these per batch, so a task worker imports
this module and not the heavy one of the step that schedules it (torch and diffusers cost a fresh process about
10 s of CPU on the project's machine).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageError",
    "convert_batch",
    "decode_image",
    "image_size",
    "png_batch",
    "preprocess_batch",
    "resize_center_crop",
    "to_model_input",
    "to_pixels",
    "training_rows",
]

# Decompression-bomb guard: refuse images above this many pixels (a 16k x 16k image), not crash on them.
MAX_PIXELS = 16384 * 16384


class ImageError(ValueError):
    """An input that cannot be used; the message is the reason reported in the manifest."""


def decode_image(item: Any) -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...), an HF-style {"bytes": ...} dict, or a uint8 array (H, W[, C]) -> RGB image."""
    if isinstance(item, dict):
        item = item.get("bytes")
    if item is None:
        raise ImageError("no image data (null)")
    if isinstance(item, np.ndarray) and item.dtype != np.uint8 and item.dtype != object:
        raise ImageError(f"pixel arrays must be uint8, got {item.dtype}")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (2, 3):
        arr = item if item.ndim == 2 or item.shape[-1] in (1, 3, 4) else None
        if arr is None:
            raise ImageError(f"pixel array of shape {item.shape} is not (H, W) or (H, W, 1|3|4)")
        img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        return img.convert("RGB")
    data = bytes(item)
    if not data:
        raise ImageError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise ImageError(f"image of {img.width}x{img.height} pixels is larger than the {MAX_PIXELS}-pixel limit")
        img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"corrupt image ({type(e).__name__}: {str(e)[:120]})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError("image has no pixels")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, with PIL's antialiasing), then centre-crop size x size."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_pixels(item: Any, resolution: int) -> np.ndarray:
    """One image, decoded, resized and centre-cropped: (3, R, R) uint8. Raises ImageError with the reason."""
    return np.asarray(resize_center_crop(decode_image(item), resolution), dtype=np.uint8).transpose(2, 0, 1)


def to_model_input(item: Any, resolution: int) -> np.ndarray:
    """One image to the model's input.

    Returns:
        (3, R, R) float32 in [-1, 1].
    Raises:
        ImageError: with the reason, for anything that is not a usable image.
    """
    return (to_pixels(item, resolution).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def convert_batch(
    items: Sequence[Any] | np.ndarray,
    labels: np.ndarray,
    convert: Callable[[Any], np.ndarray],
    shape: tuple[int, ...],
    dtype: npt.DTypeLike,
    unlabelled: str = "not in a class",
) -> tuple[np.ndarray, np.ndarray]:
    """Apply `convert(item)` to each row of a batch, keeping every row.

    Returns (N, *shape) of `dtype` (zeros where refused) and (N,) reasons: "" for a usable image,
    `unlabelled` for a label < 0, else the ImageError's message.
    """
    n = len(labels)
    out = np.zeros((n, *shape), dtype=dtype)
    reasons = np.full(n, "", dtype=object)
    for i in range(n):
        if labels[i] < 0:
            reasons[i] = unlabelled
            continue
        try:
            out[i] = convert(items[i])
        except ImageError as e:
            reasons[i] = str(e)
    return out, reasons


def image_size(item: Any) -> int:
    """The shorter side of one image (the default output size of a distilled set)."""
    img = decode_image(item)
    return min(img.size)


def preprocess_batch(batch: dict, *, resolution: int) -> dict:
    """CPU task: {item, label, key[, reason]} -> {image (N, 3, R, R) float32 in [-1, 1], label, key, reason}.

    A row that cannot be used keeps its label and key, gets a zero image and a non-empty reason.
    """
    labels = np.asarray(batch["label"], dtype=np.int64)
    images, reasons = convert_batch(
        batch["item"],
        labels,
        lambda it: to_model_input(it, resolution),
        (3, resolution, resolution),
        np.float32,
        unlabelled="not in a class of --data",
    )
    if "reason" in batch:  # a reason the reader gave (null cell, label out of range, ...) wins
        given = np.asarray(batch["reason"], dtype=object)
        reasons = np.where(given != "", given, reasons)
    return {"image": images, "label": labels, "key": np.asarray(batch["key"], dtype=object), "reason": reasons}


def training_rows(batch: dict) -> dict:
    """CPU task (finetune's DiT/VAE training rows): `preprocess_batch`'s rows -> {image, label, ok}; a refused image
    keeps its row with ok False, so the workers can count it."""
    ok = np.array([not r for r in batch["reason"]], dtype=bool)
    return {"image": batch["image"], "label": batch["label"], "ok": ok}


def png_batch(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """CPU task (the real-candidate images): source rows -> {key, png (bytes), reason} of each, resized and
    centre-cropped to size x size; a refused row gets empty bytes and its reason."""
    pngs, reasons = [], []
    for item, given in zip(batch["item"], batch["reason"], strict=True):
        png, why = b"", str(given or "")
        if not why:
            try:
                buf = io.BytesIO()
                Image.fromarray(to_pixels(item, size).transpose(1, 2, 0)).save(buf, format="PNG")
                png = buf.getvalue()
            except ImageError as e:
                why = str(e)
        pngs.append(png)
        reasons.append(why)
    return {
        "key": np.asarray(batch["key"], dtype=object),
        "png": np.array(pngs, dtype=object),
        "reason": np.array(reasons, dtype=object),
    }
