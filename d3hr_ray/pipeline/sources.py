"""Data sources as Ray Datasets: ImageFolder trees, Parquet files, the built-in digits.

Every source yields rows {item, label, key}: `item` is what `decode_image` reads (encoded bytes, an
HF-style struct, or a uint8 pixel array); `label` is the *model's* class id (-1 for a file outside
any class folder, kept so that it is counted and reported, not dropped); `key` identifies the image
stably (its path under the root, or a hash of its bytes for Parquet) and seeds its VAE noise.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from d3hr_ray.data.preprocess import ImageError, image_size
from d3hr_ray.io.fs import resolve

__all__ = ["SOURCES", "Source", "open_source", "source_kind"]


@dataclass(frozen=True)
class Source:
    """A readable data set.

    Attributes:
        dataset: ray.data.Dataset of {item, label: int64, key: str}.
        names: model class id -> class name, for the classes this run distils.
        native_size: shorter side of the source's first image (the default output size).
        skipped: inputs refused before reading, as (location, reason).
    """

    kind: str
    dataset: object
    names: dict[int, str]
    native_size: int | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _map_classes(source_names: Sequence[str], model_names: Sequence[str] | None, num_model_classes: int | None) -> dict[str, int]:
    """Source class name -> model class id: by name when the model's id2label has them all, else by position.

    With no model yet (num_model_classes None: training one), the source's classes are the model's.
    """
    if num_model_classes is None:
        return {n: i for i, n in enumerate(source_names)}
    if model_names and set(source_names) <= set(model_names):
        return {n: model_names.index(n) for n in source_names}
    if len(source_names) == num_model_classes:
        return {n: i for i, n in enumerate(source_names)}
    raise ValueError(
        f"--data has {len(source_names)} classes ({', '.join(list(source_names)[:5])}{', ...' if len(source_names) > 5 else ''}) "
        f"but the model has {num_model_classes}"
        + (f" named {', '.join(model_names[:5])}{', ...' if len(model_names) > 5 else ''}" if model_names else "")
        + "; use a model trained on these classes"
    )


def _select(ids: dict[str, int], classes: Sequence[str] | None) -> dict[int, str]:
    """--classes (names or model ids) -> {model id: name}; all classes when None."""
    by_id = {i: n for n, i in ids.items()}
    if classes is None:
        return dict(sorted(by_id.items()))
    out = {}
    for c in classes:
        if c in ids:
            out[ids[c]] = c
        elif c.isdigit() and int(c) in by_id:
            out[int(c)] = by_id[int(c)]
        else:
            raise ValueError(f"--classes: {c!r} is neither a class name nor a class id of --data")
    return dict(sorted(out.items()))


def _imagefolder(uri: str, model_names, num_model_classes, classes) -> Source:
    import ray
    from pyarrow import fs as pafs

    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"--data {uri}: not a folder")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    dirs = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and not e.base_name.startswith("."))
    if not dirs:
        raise FileNotFoundError(f"--data {uri}: no class folders (<root>/<class>/<image>) and no .parquet files")
    stray = [(f"{uri.rstrip('/')}/{e.base_name}", "not inside a class folder") for e in entries if e.type == pafs.FileType.File]
    ids = _map_classes(dirs, model_names, num_model_classes)
    names = _select(ids, classes)
    paths = [posixpath.join(root, n) for n in names.values()]
    first = None
    for p in paths:
        files = [e for e in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if e.type == pafs.FileType.File]
        for e in sorted(files, key=lambda e: e.path)[:20]:
            try:
                with fs.open_input_stream(e.path) as f:
                    first = image_size(f.read())
                break
            except ImageError:
                continue
        if first is not None:
            break
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    name_to_id = {n: i for i, n in names.items()}
    ds = ds.map_batches(_label_imagefolder, fn_kwargs={"root": root, "name_to_id": name_to_id}, batch_format="numpy")
    return Source("imagefolder", ds, names, first, stray)


def _label_imagefolder(batch: dict, *, root: str, name_to_id: dict[str, int]) -> dict:
    rel = [posixpath.relpath(p, root) for p in batch["path"]]
    labels = np.array([name_to_id.get(r.split("/", 1)[0], -1) for r in rel], dtype=np.int64)
    return {"item": batch["bytes"], "label": labels, "key": np.array(rel, dtype=object)}


def _parquet(uri: str, model_names, num_model_classes, classes) -> Source:
    import ray

    fs, path = resolve(uri)
    ds = ray.data.read_parquet(path, filesystem=fs)
    cols = set(ds.schema().names)
    if "image" not in cols or not ({"label", "class"} & cols):
        raise ValueError(f"--data {uri}: Parquet needs an 'image' column and a 'label' (int) or 'class' (str) column; found {sorted(cols)}")
    if "class" in cols:
        src_names = sorted(str(c) for c in ds.unique("class"))
        ids = _map_classes(src_names, model_names, num_model_classes)
        col = "class"
    else:
        n = num_model_classes if num_model_classes is not None else int(ds.max("label")) + 1
        ids = {(model_names[i] if model_names else str(i)): i for i in range(n)}
        col = "label"
    names = _select(ids, classes)
    keep = {i for i in names}
    name_to_id = {n: i for i, n in names.items()}
    ds = ds.select_columns(["image", col]).map_batches(
        _label_parquet, fn_kwargs={"col": col, "name_to_id": name_to_id, "keep": keep, "num": len(ids)}, batch_format="numpy"
    )
    first_rows = ds.take(1)
    native = None
    if first_rows:
        try:
            native = image_size(first_rows[0]["item"])
        except ImageError:
            native = None
    return Source("parquet", ds, names, native)


def _image_bytes(item) -> bytes:
    if isinstance(item, dict):
        item = item.get("bytes")
    return bytes(item) if item is not None else b""


def _label_parquet(batch: dict, *, col: str, name_to_id: dict[str, int], keep: set[int], num: int) -> dict:
    items = batch["image"]
    if col == "class":
        labels = np.array([name_to_id.get(str(c), -2) for c in batch["class"]], dtype=np.int64)
    else:
        raw = np.asarray(batch["label"]).astype(np.int64)
        labels = np.where((raw >= 0) & (raw < num), raw, -1)
        labels = np.where(np.isin(labels, list(keep)) | (labels < 0), labels, -2)
    keys = np.array([hashlib.blake2b(_image_bytes(it), digest_size=16).hexdigest() for it in items], dtype=object)
    sel = labels != -2  # -2: a class this run does not distil (--classes); dropped by request, not lost
    return {"item": items[sel], "label": labels[sel], "key": keys[sel]}


def _digits(uri: str, model_names, num_model_classes, classes) -> Source:
    import ray

    from d3hr_ray.data.digits import digits_rgb

    rgb, target = digits_rgb()  # (N, 8, 8, 3), (N,)
    ids = _map_classes([str(i) for i in range(10)], model_names, num_model_classes)
    names = _select(ids, classes)
    keep = np.isin(target, [int(n) for n in names.values()]) & digits_split(len(target), uri)
    rows = [{"item": rgb[i], "label": ids[str(int(target[i]))], "key": f"digits/{i}"} for i in np.flatnonzero(keep)]
    return Source("digits", ray.data.from_items(rows), names, int(rgb.shape[1]))


DIGITS_SPLITS = ("digits", "digits:train", "digits:test")


def digits_split(n: int, uri: str) -> np.ndarray:
    """(n,) bool: the images of 'digits' (all), 'digits:train' (3 of every 4) or 'digits:test' (every 4th, i % 4 == 3).

    A fixed split by position, for classifier training and testing (1,348 train, 449 test images).
    """
    if uri not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {uri!r}; use one of {', '.join(DIGITS_SPLITS)}")
    test = np.arange(n) % 4 == 3
    return {"digits": np.ones(n, dtype=bool), "digits:train": ~test, "digits:test": test}[uri]


# Registry: source kind -> opener(uri, model_names, num_model_classes, classes).
SOURCES = {"digits": _digits, "imagefolder": _imagefolder, "parquet": _parquet}


def source_kind(uri: str) -> str:
    """'digits', 'parquet' or 'imagefolder', from what is at `uri`; FileNotFoundError if nothing is."""
    if uri in DIGITS_SPLITS:
        return "digits"
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--data {uri} does not exist")
    if info.type == pafs.FileType.File:
        if path.endswith(".parquet"):
            return "parquet"
        raise ValueError(f"--data {uri}: a single file must be .parquet")
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    if any(e.type == pafs.FileType.File and e.base_name.endswith(".parquet") for e in entries):
        return "parquet"
    return "imagefolder"


def open_source(uri: str, *, model_names: Sequence[str] | None, num_model_classes: int | None, classes: Sequence[str] | None = None) -> Source:
    """Open `--data` (kind detected from what is there) as a Source labelled with the model's class ids."""
    kind = source_kind(uri)
    return SOURCES[kind](uri, list(model_names) if model_names else None, num_model_classes, classes)
