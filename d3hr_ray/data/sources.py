"""Data sources: a deterministic listing cut into shards, a shard reader, and the distill job's read task.

    list (driver, no image read) -> shards (fixed, ordered `Shard` records of <= shard_size inputs)
        -> read_shard (any worker): rows {item, label, key, reason}
        -> read_batches (the distill job's read task): one row per fixed sub-batch, pixels decoded

`--data` names one of the kinds in `SOURCES`, local or s3://, found from what is there (`source_kind`):

    imagefolder.py  a folder of class folders, <root>/<class>/<image>
    parquet.py      a .parquet file or a folder of them: an image column, an int `label` or a str `class` column
    webdataset.py   WebDataset .tar shards: a folder of them, one .tar, a brace pattern
                    (shards-{000000..000127}.tar), or a wids index .json that names them
    hf_disk.py      a Hugging Face dataset folder written by `save_to_disk` (a DatasetDict: one split's folder)
    digits.py       `digits`, `digits:train`, `digits:test`: scikit-learn's 8x8 digits, built in

Every kind yields rows {item, label, key, reason}: `item` is what `decode_image` reads (encoded bytes, an
HF-style struct, or a uint8 pixel array); `label` is the *model's* class id, or -1 for an input that
belongs to no distilled class (kept, with its `reason`, so that it is counted and reported, never
dropped); `key` identifies the image stably and seeds its VAE noise. Integer labels (Parquet, WebDataset,
saved datasets) are counted and resolved one way for all three (data/labels.py).

Shards are the unit of resumable work (`artifacts/state.py`): the same input and `shard_size` give the
same shards in the same order on every run, so a finished shard's partial statistics can be reused.
Nothing here imports torch or Ray: a read task's worker process stays small (no torch, ~300 MB less)
and starts in a fraction of the time. The Ray Datasets built on these are in `workers/datasets.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from pyarrow import fs as pafs

from d3hr_ray.data.digits import DIGITS_SPLITS, DigitsShard, list_digits, read_digits
from d3hr_ray.data.hf_disk import HFDiskShard, is_saved_dataset, list_hf_disk, read_hf_disk
from d3hr_ray.data.imagefolder import ImageFolderShard, list_imagefolder, read_imagefolder
from d3hr_ray.data.listing import DEFAULT_SHARD_SIZE, Listing, ListRequest, Shard
from d3hr_ray.data.parquet import ParquetShard, list_parquet, read_parquet
from d3hr_ray.data.preprocess import convert_batch, to_pixels
from d3hr_ray.data.subset import lowest_ranked
from d3hr_ray.data.webdataset import WebDatasetShard, is_pattern, list_webdataset, read_webdataset
from d3hr_ray.storage.fs import read_bytes, resolve
from d3hr_ray.storage.s3 import S3Error, explain_s3_error, explained, is_s3

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "SOURCES",
    "list_source",
    "per_class_subset",
    "read_batches",
    "read_class_map",
    "read_label_names",
    "read_shard",
    "shard_from_json",
    "source_kind",
]


# A kind's lister: --data and what it is asked -> the Listing.
Lister = Callable[[str, ListRequest], Listing]

# A kind's reader: its own shard record -> rows {item, label, key, reason} (each takes only its kind's record).
Reader = Callable[[Any], Iterator[dict]]

# Registry: source kind -> (its shard record, lister, reader).
SOURCES: dict[str, tuple[type[Shard], Lister, Reader]] = {
    "digits": (DigitsShard, list_digits, read_digits),
    "hf_disk": (HFDiskShard, list_hf_disk, read_hf_disk),
    "imagefolder": (ImageFolderShard, list_imagefolder, read_imagefolder),
    "parquet": (ParquetShard, list_parquet, read_parquet),
    "webdataset": (WebDatasetShard, list_webdataset, read_webdataset),
}


def source_kind(uri: str) -> str:
    """The kind of --data, from what is there (docs/distill.md, "Data formats"); FileNotFoundError if nothing is.

    digits: `digits`, `digits:train`, `digits:test`. webdataset: a brace pattern, a .tar file, or a folder
    holding .tar files. hf_disk: a folder written by `datasets`' save_to_disk (state.json, dataset_info.json).
    parquet: a .parquet file, or a folder holding .parquet files. imagefolder: any other folder.
    """
    with explained(uri):
        return _source_kind(uri)


def _source_kind(uri: str) -> str:
    if uri in DIGITS_SPLITS:
        return "digits"
    if is_pattern(uri):
        return "webdataset"
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        bucket = path.split("/", 1)[0]
        if is_s3(uri) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise S3Error(explain_s3_error(uri, OSError("NoSuchBucket")))
        raise FileNotFoundError(f"--data {uri} does not exist")
    if info.type == pafs.FileType.File:
        for ext, kind in ((".parquet", "parquet"), (".tar", "webdataset"), (".json", "webdataset")):
            if path.endswith(ext):
                return kind
        raise ValueError(f"--data {uri}: a single file must be .parquet, a WebDataset .tar shard or a wids .json index")
    names = [
        e.base_name for e in fs.get_file_info(pafs.FileSelector(path, recursive=False)) if e.type == pafs.FileType.File
    ]
    if is_saved_dataset(names):
        return "hf_disk"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    return "imagefolder"


def list_source(
    uri: str,
    *,
    model_names: Sequence[str] | None,
    num_model_classes: int | None,
    classes: Sequence[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    label_names: Sequence[str] | None = None,
    class_map: dict[str, int | str] | None = None,
    output: str | None = None,
) -> Listing:
    """List `--data` (kind detected from what is there), labelled with the model's class ids, cut into shards.

    `label_names` name integer labels (Parquet without ClassLabel metadata, WebDataset's .cls), in label order.
    `class_map` (--class-map, `read_class_map`) sends data classes to model classes (`listing.map_classes`).
    `output` (the job's --output) is where a kind that indexes its files keeps the indexes (WebDataset: per tar).
    """
    with explained(uri):
        _, lister, _ = SOURCES[source_kind(uri)]
        ask = ListRequest(
            list(model_names) if model_names else None,
            num_model_classes,
            classes,
            shard_size,
            list(label_names) if label_names else None,
            class_map,
            output,
        )
        return lister(uri, ask)


def read_label_names(uri: str | None) -> list[str] | None:
    """--class-names: the names of integer labels 0, 1, ..., one a line of a text file (local or s3://); else None."""
    if uri is None:
        return None
    names = [line.strip() for line in read_bytes(uri).decode("utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--class-names {uri}: no names in it (one a line)")
    return names


def read_class_map(uri: str | None) -> dict[str, int | str] | None:
    """--class-map: {data class: model class id or name} from a JSON object or a two-column CSV (no header; '#'
    starts a comment line), local or s3://; None when not given."""
    if uri is None:
        return None
    text = read_bytes(uri).decode("utf-8")
    if uri.endswith(".json") or text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--class-map {uri}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(doc, dict) or not all(isinstance(v, int | str) for v in doc.values()):
            raise ValueError(f"--class-map {uri}: expected an object of data class -> model class id or name")
        return {str(k): v for k, v in doc.items()}
    mapping: dict[str, int | str] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 2:
            raise ValueError(f"--class-map {uri}: line {n} has {len(row)} fields; expected data class,model class")
        mapping[row[0].strip()] = row[1].strip()
    if not mapping:
        raise ValueError(f"--class-map {uri}: no data class -> model class lines in it")
    return mapping


def read_shard(shard: Shard) -> Iterator[dict]:
    """The rows {item, label, key, reason} of one shard, in listing order (narrowed by `keys_only`, `only`)."""
    with explained(shard.uri):
        yield from SOURCES[shard.kind][2](shard)


def shard_from_json(text: str) -> Shard:
    """The record `Shard.to_json` wrote (lists come back as tuples)."""
    d = json.loads(text)
    cls = SOURCES[d.pop("kind")][0]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON's values
    return cls(**fields)


def per_class_subset(listing: Listing, per_class: int, seed: int) -> Listing:
    """The listing narrowed to `per_class` inputs of each class (all of a class that has fewer): a uniform
    random subset, `derive_seed(seed, "stats-subset", key)` ranks, the same whatever the shards or workers.

    A keys-only pass over every shard (no image read); the shards keep their ids (so their state files
    stay theirs) and read only their chosen inputs, and a shard left with none is dropped. Counts are the subset's.
    """

    def keys() -> Iterator[dict]:
        for shard in listing.shards:
            rows = list(read_shard(shard.keys_pass()))
            yield {
                "label": np.array([r["label"] for r in rows], dtype=np.int64),
                "key": [r["key"] for r in rows],
                "shard": np.full(len(rows), shard.id, dtype=np.int64),
            }

    chosen, _ = lowest_ranked(keys(), per_class, seed, "stats-subset")
    by_shard: dict[int, list[str]] = {}
    counts = dict.fromkeys(listing.counts, 0)
    for key, (label, shard) in chosen.items():
        by_shard.setdefault(shard, []).append(key)
        counts[label] = counts.get(label, 0) + 1
    shards = [s.narrowed(by_shard[s.id]) for s in listing.shards if s.id in by_shard]
    return dataclasses.replace(listing, shards=shards, counts=counts, listed=sum(listing.counts.values()))


def read_batches(batch: dict, *, resolution: int, batch_size: int) -> Iterator[dict]:
    """CPU task: shard records (JSON) -> one row per fixed sub-batch of `batch_size` inputs.

    Inputs refused here (unreadable, corrupt, outside any class) leave the sub-batch and are listed
    in its meta with their reason; `read` counts every input of a distilled class, refused or not.
    Yields:
        {shard: (1,) int64, part: (1,) int64, parts: (1,) int64,
         pixels: (1,) bytes of (n, 3, R, R) uint8, meta: (1,) JSON}
    """
    for text in batch["shard"]:
        shard = shard_from_json(text)
        rows = list(read_shard(shard))  # at most shard_size encoded images
        cuts = [(s, min(s + batch_size, len(rows))) for s in range(0, len(rows), batch_size)] or [(0, 0)]
        for part, (a, b) in enumerate(cuts):
            chunk = rows[a:b]
            labels = np.array([r["label"] for r in chunk], dtype=np.int64)
            pixels, reasons = convert_batch(
                [r["item"] for r in chunk],
                labels,
                lambda it: to_pixels(it, resolution),
                (3, resolution, resolution),
                np.uint8,
                unlabelled="not in a class of --data",
            )
            why_not = [r["reason"] or why for r, why in zip(chunk, reasons, strict=True)]
            ok = [i for i, why in enumerate(why_not) if not why]
            read: dict[int, int] = {}
            for y in labels[labels >= 0].tolist():
                read[y] = read.get(y, 0) + 1
            meta = {
                "labels": [int(labels[i]) for i in ok],
                "keys": [chunk[i]["key"] for i in ok],
                "read": read,
                "skipped": [[chunk[i]["key"], int(labels[i]), why_not[i]] for i in range(len(chunk)) if why_not[i]],
            }
            yield {
                "shard": np.array([shard.id], dtype=np.int64),
                "part": np.array([part], dtype=np.int64),
                "parts": np.array([len(cuts)], dtype=np.int64),
                "pixels": np.array([np.ascontiguousarray(pixels[ok]).tobytes()], dtype=object),
                "meta": np.array([json.dumps(meta)], dtype=object),
            }
