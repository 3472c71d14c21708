"""Hugging Face datasets saved with `Dataset.save_to_disk`: a folder of Arrow stream files with its state.json
(the files, in order) and dataset_info.json (the features: an Image column and a ClassLabel column).

    --data  the saved Dataset's folder (for a saved DatasetDict, the folder of one split: my_dict/train)

Rows need an `image` column (the Image feature's {bytes, path} struct, or bytes) and an integer `label` column,
named by the ClassLabel feature's names (else by `--class-names`, else by their numbers) and mapped to the
model's classes as every integer label is (`listing.integer_label_ids`). A shard is a row range of one file;
keys are `<file>:<row in the file>`. Local files are memory-mapped: the listing touches the label column's
pages and no image's; on s3:// an Arrow stream can only be read whole, so the listing reads each file once
(Parquet or WebDataset suit S3 better).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
from pyarrow import fs as pafs

from d3hr_ray.data.labels import LabelledShard, count_integer_labels
from d3hr_ray.data.listing import LabelValue, Listing, ListRequest, Shard, probe_native_size, runs
from d3hr_ray.storage.fs import resolve

__all__ = ["HFDiskShard", "is_saved_dataset", "list_hf_disk", "read_hf_disk"]

STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"
DICT_FILE = "dataset_dict.json"


@dataclass(frozen=True, kw_only=True)
class HFDiskShard(LabelledShard):
    """Rows [start, stop) of one Arrow file of the saved dataset."""

    kind: ClassVar[str] = "hf_disk"
    file: str  # the Arrow file, a path in the filesystem of `uri`


def is_saved_dataset(names: list[str]) -> bool:
    """Whether a folder's file names are those of `save_to_disk` (a Dataset, or a DatasetDict's root)."""
    return (STATE_FILE in names and INFO_FILE in names) or DICT_FILE in names


def _read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _open(fs: pafs.FileSystem, path: str) -> pa.ipc.RecordBatchStreamReader:
    """An Arrow stream reader over a file: memory-mapped when local, read whole from s3://."""
    if isinstance(fs, pafs.LocalFileSystem):
        return pa.ipc.open_stream(pa.memory_map(path))
    with fs.open_input_stream(path) as f:
        return pa.ipc.open_stream(pa.py_buffer(f.read()))


def _files(fs: pafs.FileSystem, uri: str) -> tuple[str, list[str], list[str] | None]:
    """(the folder, its Arrow files in order, the ClassLabel names of `label` or None)."""
    _, root = resolve(uri)
    names = [e.base_name for e in fs.get_file_info(pafs.FileSelector(root, recursive=False))]
    if DICT_FILE in names and STATE_FILE not in names:
        splits = _read_json(fs, posixpath.join(root, DICT_FILE)).get("splits", [])
        raise ValueError(
            f"--data {uri} is a saved DatasetDict: name one split's folder ({', '.join(f'{uri}/{s}' for s in splits)})"
        )
    state = _read_json(fs, posixpath.join(root, STATE_FILE))
    files = [posixpath.join(root, d["filename"]) for d in state.get("_data_files", [])]
    if not files:
        raise FileNotFoundError(f"--data {uri}: {STATE_FILE} names no data files")
    features = _read_json(fs, posixpath.join(root, INFO_FILE)).get("features", {})
    missing = [c for c in ("image", "label") if c not in features]
    if missing:
        raise ValueError(
            f"--data {uri}: a saved dataset needs an 'image' and a 'label' feature; it has {sorted(features)}"
        )
    label = features["label"]
    names_of = label.get("names") if isinstance(label, dict) and label.get("_type") == "ClassLabel" else None
    return root, files, [str(n) for n in names_of] if names_of else None


def list_hf_disk(uri: str, ask: ListRequest) -> Listing:
    fs, _ = resolve(uri)
    _, files, class_label = _files(fs, uri)
    values: Counter[LabelValue] = Counter()
    lengths = []
    for path in files:
        n = 0
        for batch in _open(fs, path):
            values.update(batch.column("label").to_pylist())
            n += batch.num_rows
        lengths.append(n)
    found = count_integer_labels(values, class_label or ask.label_names, ask)  # ClassLabel names win
    shards: list[Shard] = []
    for path, n in zip(files, lengths, strict=True):
        for start, stop in runs(n, ask.shard_size):
            shards.append(HFDiskShard(id=len(shards), uri=uri, file=path, start=start, stop=stop, **found.shard))
    native = probe_native_size(shards, read_hf_disk)
    return Listing("hf_disk", uri, found.names, found.counts, shards, native)


def read_hf_disk(shard: HFDiskShard) -> Iterator[dict]:
    """The shard's rows {item: the image cell, label, key, reason}; `keys_only` touches no image."""
    fs, _ = resolve(shard.uri)
    name = posixpath.basename(shard.file)
    only = None if shard.only is None else set(shard.only)
    row = 0
    for batch in _open(fs, shard.file):
        lo, hi = max(shard.start - row, 0), min(shard.stop - row, batch.num_rows)
        row += batch.num_rows
        if lo >= hi:
            if row >= shard.stop:
                break
            continue
        part = batch.slice(lo, hi - lo)
        values = part.column("label").to_pylist()
        images = None if shard.keys_only else part.column("image")
        for i, value in enumerate(values):
            key = f"{name}:{row - batch.num_rows + lo + i}"
            if only is not None and key not in only:
                continue
            found = shard.label_of(value)
            if found is None:
                continue  # a class this run does not distil (--classes)
            label, reason = found
            if images is None:  # keys_only
                yield {"item": None, "label": label, "key": key, "reason": reason}
                continue
            item = images[i].as_py()
            if not reason and (item is None or (isinstance(item, dict) and item.get("bytes") is None)):
                reason = "no image data (null)"
            yield {"item": item, "label": label, "key": key, "reason": reason}
