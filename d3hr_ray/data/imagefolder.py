"""ImageFolder sources: <root>/<class>/<image>, local or s3:// (a class folder's name is its class).

Shards never span two classes: a class folder is listed (recursively, sorted) and cut into runs of
`shard_size` files. Keys are paths under the root. Hidden folders, files outside a class folder and
files without an image extension are listed as skipped with their reason, never read. On S3 the class
folders are listed in parallel (LIST_THREADS at once) and an image costs one GET to read.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

from pyarrow import fs as pafs

from d3hr_ray.data.listing import PROBE, Listing, ListRequest, Shard, map_classes, runs, select_classes
from d3hr_ray.data.preprocess import ImageError, image_size
from d3hr_ray.storage.fs import read_object, resolve

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderShard", "is_image_name", "list_imagefolder", "read_imagefolder"]

# The file extensions read as images (lower case; PIL decodes them all). Any other file in a class folder
# (README.txt, labels.json, .DS_Store) is refused by the listing, reported, and never read.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Class folders listed at once.
LIST_THREADS = 16


@dataclass(frozen=True, kw_only=True)
class ImageFolderShard(Shard):
    """Files [start, stop) of one class folder, in sorted order; every row has the class id `label`."""

    kind: ClassVar[str] = "imagefolder"
    root: str  # the data's root (keys are paths under it)
    folder: str  # the class folder
    label: int  # the model's class id


def is_image_name(path: str) -> bool:
    """Whether an ImageFolder file is read as an image: its extension is in IMAGE_EXTENSIONS (any case)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _class_files(fs: pafs.FileSystem, folder: str) -> tuple[list[str], list[str]]:
    """(images, others) under a class folder (recursive), each sorted: images are the order shards are cut in."""
    entries = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File)
    return [p for p in files if is_image_name(p)], [p for p in files if not is_image_name(p)]


def list_imagefolder(uri: str, ask: ListRequest) -> Listing:
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"--data {uri}: not a folder")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    # Hidden folders (.cache, .ipynb_checkpoints, ...) are not read as classes; they are listed as skipped,
    # so that nothing is left out silently.
    dirs = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and not e.base_name.startswith("."))
    hidden = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("."))
    if not dirs:
        raise FileNotFoundError(f"--data {uri}: no class folders (<root>/<class>/<image>) and no .parquet files")
    base = uri.rstrip("/")
    skipped = [(f"{base}/{e.base_name}", "not inside a class folder") for e in entries if e.type == pafs.FileType.File]
    skipped += [(f"{base}/{h}/", "hidden folder (name starts with '.'): not read as a class") for h in hidden]
    ids = map_classes(dirs, ask.model_names, ask.num_model_classes, ask.class_map)
    names = select_classes(ids, ask.classes)
    shards: list[Shard] = []
    counts: dict[int, int] = {}
    native: int | None = None
    folders = [posixpath.join(root, name) for name in names.values()]
    # Listed once here for the counts (each shard task lists its folder again), LIST_THREADS folders at once: on
    # S3 a folder is one request a 1,000 files, a round trip of tens of milliseconds.
    with ThreadPoolExecutor(max(1, min(LIST_THREADS, len(folders)))) as pool:
        listed = list(pool.map(lambda folder: _class_files(fs, folder), folders))
    for cid, folder, (files, others) in zip(names, folders, listed, strict=True):
        skipped += [(f"{base}/{posixpath.relpath(p, root)}", "not an image file extension") for p in others]
        counts[cid] = len(files)
        for start, stop in runs(len(files), ask.shard_size):
            shards.append(
                ImageFolderShard(id=len(shards), uri=uri, root=root, folder=folder, label=cid, start=start, stop=stop)
            )
        if native is None:
            native = _probe(fs, files[:PROBE])
    return Listing("imagefolder", uri, names, counts, shards, native, skipped)


def _probe(fs: pafs.FileSystem, paths: list[str]) -> int | None:
    for p in paths:
        try:
            return image_size(read_object(fs, p))
        except (ImageError, OSError):
            continue
    return None


def read_imagefolder(shard: ImageFolderShard) -> Iterator[dict]:
    """The shard's rows {item: file bytes, label, key, reason}; `keys_only` opens no file."""
    fs, _ = resolve(shard.uri)
    files = _class_files(fs, shard.folder)[0][shard.start : shard.stop]
    if len(files) != shard.stop - shard.start:
        raise RuntimeError(f"{shard.folder}: the folder changed since it was listed (files were removed)")
    only = None if shard.only is None else set(shard.only)
    for p in files:
        key = posixpath.relpath(p, shard.root)
        if only is not None and key not in only:
            continue
        if shard.keys_only:
            yield {"item": b"", "label": shard.label, "key": key, "reason": ""}
            continue
        try:
            item, reason = read_object(fs, p), ""  # one GET on S3
        except OSError as e:
            item, reason = b"", f"cannot read the file ({type(e).__name__})"
        yield {"item": item, "label": shard.label, "key": key, "reason": reason}
