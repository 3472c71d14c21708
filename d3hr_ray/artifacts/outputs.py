"""The distilled set on disk (local or s3://): statistics, latents, images, Parquet, grid, manifest.

Every file is written atomically through `OutputDir`. Formats:
- stats.safetensors: mean (C, D) float32, var (C, D) float32, count (C,) int64; metadata strings.
- latents.safetensors: latents (C*IPC, c, h, w) float32 (the selected z_K), labels (C*IPC,) int64.
- images/<class folder>/<k>.png (`class_folder`: the name made one safe path segment);
  distilled.parquet in Hugging Face's image layout (image: {bytes: PNG, path}, label: int64, class:
  string; ClassLabel names in the schema's `huggingface` metadata).
- grid.png: up to 10 classes x 10 images, a row per class, labelled; manifest.json (`report.Manifest`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load

from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.errors import check_version
from d3hr_ray.storage.fs import OutputDir, read_bytes

__all__ = [
    "STATS_VERSION",
    "Moments",
    "OUTPUTS",
    "StatsMeta",
    "assemble",
    "class_folder",
    "clear_outputs",
    "write_class",
    "grid_png",
    "image_path",
    "label_names",
    "manifest_bytes",
    "read_stats",
    "versions",
    "write_manifest",
    "write_stats",
]

# What --overwrite removes: every file a run writes, nothing else in the folder. The WebDataset listing's per-tar
# index (_state/index/, keyed by each tar's path, size and mtime) describes the input, not a run: it is kept.
OUTPUTS = (
    "_state/run.json",
    "_state/blocks",
    "_state/shards",  # written by version 1
    "_state/classes",
    "_state/latents",
    "images",
    "stats.safetensors",
    "latents.safetensors",
    "distilled.parquet",
    "grid.png",
    "manifest.json",
    "report.html",
    "report",  # report.html's other pages and thumbnails
    "README.md",  # the dataset card
    "mlflow.json",  # --overwrite starts a new MLflow run too
)


def clear_outputs(out: OutputDir) -> None:
    """--overwrite: remove every file a run writes (`OUTPUTS`) from `out`, and nothing else."""
    for rel in OUTPUTS:
        out.remove(rel)


_ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<i8"): "I64"}


def _safetensors_header(
    entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None = None
) -> bytes:
    """The 8-byte length + JSON header of a safetensors file for (name, dtype, shape, nbytes) in order.

    Written by hand (keys sorted, no spaces) because the safetensors library orders metadata by a hash
    map, so the same file would come out with different bytes from run to run.
    """
    header: dict[str, dict[str, Any]] = {}
    offset = 0
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of float32 / int64 arrays, byte-identical for identical inputs."""
    arrays = {k: np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")) for k, v in sorted(arrays.items())}
    head = _safetensors_header([(k, _ST_DTYPES[v.dtype], list(v.shape), v.nbytes) for k, v in arrays.items()], metadata)
    return head + b"".join(v.tobytes() for v in arrays.values())


@dataclass(frozen=True)
class Moments:
    """The finalised statistics the generation reads: mean, var (C, D) float32 (the values written), count (C,), and
    the classes with fewer than 2 usable inputs (no variance: they cannot be distilled)."""

    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray
    short: list[int]


# stats.safetensors' metadata version (StatsMeta): 1, files without a "version" key; 2, with it.
STATS_VERSION = 2


@dataclass(frozen=True)
class StatsMeta:
    """stats.safetensors' metadata: what the statistics were computed from and with.

    On disk every value is a string (safetensors metadata): numbers as `str(x)`, the class names as a JSON list,
    and "version" (STATS_VERSION: 1, files without the key, written before this record; 2, with it). `from_meta`
    reads every version up to STATS_VERSION (a key a file lacks is None) and refuses a newer one.
    """

    model: str | None = None
    steps: int | None = None
    inversion_step: int | None = None
    timestep: int | None = None
    guidance: float | None = None
    encode: str | None = None
    seed: int | None = None
    data: str | None = None
    class_names: list[str] | None = None  # every class of the model, in id order
    native_size: int | None = None

    def to_meta(self) -> dict[str, str]:
        """The file's string metadata (keys whose value is None are left out)."""
        out: dict[str, str] = {}
        for key, value in self.__dict__.items():
            if value is not None:
                out[key] = json.dumps(value) if isinstance(value, list) else str(value)
        out["version"] = str(STATS_VERSION)
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> StatsMeta:
        """The metadata of a statistics file, as `to_meta` writes it (or a file with fewer keys)."""
        check_version(meta.get("version", "1"), STATS_VERSION, "the statistics file")

        def integer(key: str) -> int | None:
            return int(meta[key]) if key in meta else None

        names = meta.get("class_names")
        return cls(
            model=meta.get("model"),
            steps=integer("steps"),
            inversion_step=integer("inversion_step"),
            timestep=integer("timestep"),
            guidance=float(meta["guidance"]) if "guidance" in meta else None,
            encode=meta.get("encode"),
            seed=integer("seed"),
            data=meta.get("data"),
            class_names=list(json.loads(names)) if names else None,
            native_size=integer("native_size"),
        )


def write_stats(out: OutputDir, mean: np.ndarray, var: np.ndarray, count: np.ndarray, meta: StatsMeta) -> str:
    """stats.safetensors: mean, var (C, D) float32 and count (C,) int64, with the metadata `meta`."""
    blob = safetensors_bytes(
        {
            "mean": np.asarray(mean, dtype=np.float32),
            "var": np.asarray(var, dtype=np.float32),
            "count": np.asarray(count, dtype=np.int64),
        },
        metadata=meta.to_meta(),
    )
    return out.write_bytes("stats.safetensors", blob)


def read_stats(uri: str) -> tuple[dict[str, np.ndarray], StatsMeta]:
    """stats.safetensors (local or s3://) -> ({mean, var, count} numpy arrays, its metadata)."""
    blob = read_bytes(uri)
    tensors = {k: v.numpy() for k, v in load(blob).items()}
    missing = {"mean", "var", "count"} - set(tensors)
    if missing:
        raise ValueError(f"--from-stats {uri}: not a statistics file (missing {sorted(missing)})")
    # The metadata is in the file's JSON header: 8 bytes of length, then the header.
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return tensors, StatsMeta.from_meta(header.get("__metadata__") or {})


def class_folder(name: str) -> str:
    """A class name as one safe path segment: injective, so distinct names never share a folder.

    '%', '/', '\\', control characters and a leading '.' are percent-encoded ("T-shirt/top" ->
    "T-shirt%2Ftop", ".." -> "%2E."); unicode letters and spaces stay. An empty name is "%"; a name
    longer than 200 bytes keeps a prefix and gains a hash. distilled.parquet and manifest.json keep
    the names unchanged.
    """
    if name == "":
        return "%"
    out = []
    for i, ch in enumerate(name):
        if ch in "%/\\" or ord(ch) < 32 or ord(ch) == 127 or (i == 0 and ch == "."):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    safe = "".join(out)
    if len(safe.encode("utf-8")) > 200:
        digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).hexdigest()
        safe = safe.encode("utf-8")[:180].decode("utf-8", "ignore") + "~" + digest
    return safe


def image_path(name: str, k: int) -> str:
    """images/<class folder>/<k>.png: the distilled image's place in the ImageFolder layout."""
    return f"images/{class_folder(name)}/{k}.png"


def write_class(
    out: OutputDir,
    state: RunState,
    class_id: int,
    name: str,
    latents: np.ndarray,
    pngs: list[bytes],
    score: float,
    keys: list[str] | None = None,
) -> None:
    """A distilled class: its images (images/<class folder>/<k>.png) first, then its state file, which marks them
    finished (`RunState.write_class`: latents (IPC, D) float32, the PNGs, the score, the real inputs' keys)."""
    for k, png in enumerate(pngs):
        out.write_bytes(image_path(name, k), png)
    state.write_class(class_id, latents, pngs, score, keys=keys)


def label_names(names: dict[int, str]) -> list[str]:
    """The ClassLabel names of distilled.parquet, label order: ids 0..max(names), an id not distilled named by itself.

    One list for the Parquet schema and the dataset card (artifacts/card.py), so both tell `datasets` the same names.
    """
    return [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []


def _hf_metadata(names: dict[int, str]) -> bytes:
    """Hugging Face datasets' schema metadata: image feature + ClassLabel names in label order."""
    ordered = label_names(names)
    info = {
        "info": {
            "features": {
                "image": {"_type": "Image"},
                "label": {"names": ordered, "_type": "ClassLabel"},
                "class": {"dtype": "string", "_type": "Value"},
            }
        }
    }
    return json.dumps(info).encode()


def assemble(
    out: OutputDir, state: RunState, names: dict[int, str], ipc: int, latent_shape: tuple[int, int, int]
) -> tuple[list[str], dict[int, float]]:
    """Build distilled.parquet, latents.safetensors and grid.png from the per-class state files.

    Classes are read in id order, a few at a time, so memory is one chunk of classes (not the whole
    distilled set) and the outputs do not depend on which run generated which class.
    Returns (files written, class id -> score).
    """
    classes = sorted(names)
    d = int(np.prod(latent_shape))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("image", image_type), ("label", pa.int64()), ("class", pa.string())],
        metadata={b"huggingface": _hf_metadata(names)},
    )
    parquet_tmp, latents_tmp = out.scratch(".parquet"), out.scratch(".safetensors")
    writer = pq.ParquetWriter(parquet_tmp, schema)
    lat = _LatentsFile(latents_tmp, len(classes) * ipc, latent_shape)
    grid: dict[tuple[int, int], bytes] = {}
    scores: dict[int, float] = {}
    ok = False
    try:
        for c, (latents, pngs, score) in state.iter_classes(classes):
            if latents.shape != (ipc, d) or len(pngs) != ipc:
                raise RuntimeError(
                    f"the state of class {names[c]!r} holds {len(pngs)} images, not --ipc {ipc}; rerun with --overwrite"
                )
            scores[c] = score
            lat.append(latents, c)
            paths = [image_path(names[c], k) for k in range(ipc)]
            writer.write_table(
                pa.table(
                    {
                        "image": [{"bytes": p, "path": q} for p, q in zip(pngs, paths, strict=True)],
                        "label": [c] * ipc,
                        "class": [names[c]] * ipc,
                    },
                    schema=schema,
                )
            )
            if len(grid) < 100 and c in classes[:10]:
                grid.update({(c, k): pngs[k] for k in range(min(ipc, 10))})
        ok = True
    finally:
        writer.close()
        lat.close()
        if not ok:  # leave no scratch file behind in the output folder
            for tmp in (parquet_tmp, latents_tmp):
                Path(tmp).unlink(missing_ok=True)
    written = [out.write_file("distilled.parquet", parquet_tmp), out.write_file("latents.safetensors", latents_tmp)]
    written.append(out.write_bytes("grid.png", grid_png(grid, names, ipc)))
    return written, scores


class _LatentsFile:
    """latents.safetensors written as it grows: latents (N, c, h, w) float32, then labels (N,) int64.

    The safetensors layout is an 8-byte header length, a JSON header, then the raw tensors; the shapes
    are known up front, so the header is written first and the rows streamed after it.
    """

    def __init__(self, path: str, n: int, latent_shape: tuple[int, int, int]):
        d = int(np.prod(latent_shape))
        self.f = open(path, "wb")
        self.f.write(
            _safetensors_header([("latents", "F32", [n, *latent_shape], n * d * 4), ("labels", "I64", [n], 8 * n)])
        )
        self.n, self.labels = n, list[int]()

    def append(self, latents: np.ndarray, label: int) -> None:
        self.f.write(np.ascontiguousarray(latents, dtype="<f4").tobytes())
        self.labels += [label] * len(latents)

    def close(self) -> None:
        if not self.f.closed:
            self.f.write(np.asarray(self.labels, dtype="<i8").tobytes())
            self.f.close()


def grid_png(thumbs_png: dict[tuple[int, int], bytes], names: dict[int, str], ipc: int) -> bytes:
    """Up to 10 classes x 10 images, a labelled row per class."""
    classes = sorted({c for c, _ in thumbs_png})
    thumbs = {key: Image.open(io.BytesIO(png)).convert("RGB") for key, png in thumbs_png.items()}
    side = max(32, max((im.size[0] for im in thumbs.values()), default=32))
    side = min(side, 128)
    margin, gap = 90, 2
    cell = side + gap
    cols = min(10, ipc)
    canvas = Image.new("RGB", (margin + cols * cell, max(1, len(classes)) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, c in enumerate(classes):
        draw.text((4, r * cell + side // 2 - 6), str(names[c])[:14], fill="black", font=font)
        for k in range(cols):
            im = thumbs.get((c, k))
            if im is not None:
                im = im.resize(
                    (side, side), Image.Resampling.NEAREST if im.size[0] < side else Image.Resampling.LANCZOS
                )
                canvas.paste(im, (margin + k * cell, r * cell))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on."""
    out = {}
    for pkg in ("d3hr_ray", "torch", "diffusers", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def manifest_bytes(manifest: Manifest) -> bytes:
    """manifest.json's bytes: the manifest's JSON, indented, in `Manifest.to_json`'s key order."""
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n").encode()


def write_manifest(out: OutputDir, manifest: Manifest) -> str:
    return out.write_bytes("manifest.json", manifest_bytes(manifest))
