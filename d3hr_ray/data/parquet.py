"""Parquet sources: Hugging Face's image layout (an `image` struct of bytes and path, or raw bytes) with an
int `label` column (named by the schema's ClassLabel metadata when present) or a string `class` column.

Shards are row ranges of one row group; keys are `<file under the root>:<row in the file>`. The label
column alone is read to list and count (files LIST_THREADS at once), and for a `keys_only` pass; a shard's
columns are fetched in one coalesced read of its row group (`pre_buffer`), not a request a column page. A row
whose label is null or outside the data's classes keeps its place with a reason (counted and reported, never
dropped silently).
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from d3hr_ray.data.labels import LabelCounts, LabelledShard, count_integer_labels, count_labels
from d3hr_ray.data.listing import (
    LabelValue,
    Listing,
    ListRequest,
    Shard,
    map_classes,
    probe_native_size,
    runs,
)
from d3hr_ray.storage.fs import resolve

__all__ = ["ParquetShard", "hf_class_names", "list_parquet", "read_parquet"]

# Files whose footer and labels are read at once (S3 round trips overlap).
LIST_THREADS = 16


@dataclass(frozen=True, kw_only=True)
class ParquetShard(LabelledShard):
    """Rows [start, stop) of one row group of one file; `labels` maps the label column's values."""

    kind: ClassVar[str] = "parquet"
    file: str
    row_group: int
    offset: int  # rows of the file before this row group (keys count rows in the file)
    column: str  # the label column: "label" (the data's int ids) or "class" (names)


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(e.path for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(".parquet"))


def hf_class_names(schema: pa.Schema) -> list[str] | None:
    """ClassLabel names of the 'label' column from a Hugging Face datasets schema's metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feats = json.loads(meta).get("info", {}).get("features", {})
        names = feats.get("label", {}).get("names")
    except (ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _count(col: str, values: Mapping[LabelValue, int], hf_names: list[str] | None, ask: ListRequest) -> LabelCounts:
    """The label column's values counted and mapped: `class` holds names, `label` integer labels."""
    if col == "class":
        names = sorted(str(c) for c in values if c is not None)
        ids = map_classes(names, ask.model_names, ask.num_model_classes, ask.class_map)
        return count_labels(values, ids, dict(ids), "the classes listed", ask.classes)
    return count_integer_labels(values, hf_names or ask.label_names, ask)


def _labels_of(fs: pafs.FileSystem, file: str) -> tuple[pa.Schema, list[int], list[LabelValue]]:
    """(the file's Arrow schema, rows a row group, the label column's values: `class` if the file has it, else
    `label`, else []): the footer and the label column alone, its row groups fetched together (pre_buffer)."""
    pf = pq.ParquetFile(file, filesystem=fs, pre_buffer=True)
    schema = pf.schema_arrow
    col = "class" if "class" in schema.names else "label" if "label" in schema.names else None
    values = pf.read(columns=[col]).column(0).to_pylist() if col and "image" in schema.names else []
    return schema, [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], values


def list_parquet(uri: str, ask: ListRequest) -> Listing:
    fs, path = resolve(uri)
    files = _parquet_files(fs, path)
    if not files:
        raise FileNotFoundError(f"--data {uri}: no .parquet files")
    metas: list[tuple[str, list[int]]] = []
    values: Counter[LabelValue] = Counter()
    hf_names: list[str] | None = None
    col = ""
    with ThreadPoolExecutor(min(LIST_THREADS, len(files))) as pool:  # footers and label columns, files at once
        listed = list(pool.map(lambda f: _labels_of(fs, f), files))
    for f, (schema, groups, column) in zip(files, listed, strict=True):
        cols = set(schema.names)
        if "image" not in cols or not ({"label", "class"} & cols):
            raise ValueError(
                f"--data {uri}: Parquet needs an 'image' column and a 'label' (int) or 'class' (str) "
                f"column; {f} has {sorted(cols)}"
            )
        this = "class" if "class" in cols else "label"
        if col and this != col:
            raise ValueError(f"--data {uri}: some files label rows by 'class', others by 'label'; use one")
        col = this
        hf_names = hf_names or hf_class_names(schema)
        metas.append((f, groups))
        values.update(column)
    found = _count(col, values, hf_names, ask)
    shards: list[Shard] = []
    for f, groups in metas:
        for g, rows in enumerate(groups):
            for start, stop in runs(rows, ask.shard_size):
                shards.append(
                    ParquetShard(
                        id=len(shards),
                        uri=uri,
                        file=f,
                        row_group=g,
                        offset=sum(groups[:g]),
                        start=start,
                        stop=stop,
                        column=col,
                        **found.shard,
                    )
                )
    native = probe_native_size(shards, read_parquet)
    return Listing("parquet", uri, found.names, found.counts, shards, native)


def read_parquet(shard: ParquetShard) -> Iterator[dict]:
    """The shard's rows {item: the image cell, label, key, reason}; `keys_only` reads the label column alone."""
    fs, path = resolve(shard.uri)
    pf = pq.ParquetFile(shard.file, filesystem=fs, pre_buffer=True)  # the row group's columns in one large read
    columns = [shard.column] if shard.keys_only else ["image", shard.column]
    table = pf.read_row_group(shard.row_group, columns=columns).slice(shard.start, shard.stop - shard.start)
    rel = posixpath.relpath(shard.file, path) if shard.file != path else posixpath.basename(path)
    only = None if shard.only is None else set(shard.only)
    images = None if shard.keys_only else table.column("image")
    for i, value in enumerate(table.column(shard.column).to_pylist()):
        key = f"{rel}:{shard.offset + shard.start + i}"
        if only is not None and key not in only:
            continue
        found = shard.label_of(value, name=shard.column)
        if found is None:
            continue  # a class this run does not distil (--classes): left out by request, not lost
        label, reason = found
        if images is None:  # keys_only
            yield {"item": None, "label": label, "key": key, "reason": reason}
            continue
        try:
            item = images[i].as_py()
        except Exception as e:  # an image cell pyarrow cannot turn into Python: report, never crash the shard
            item, reason = None, reason or f"unreadable image cell ({type(e).__name__})"
        if not reason and (item is None or (isinstance(item, dict) and item.get("bytes") is None)):
            reason = "no image data (null)"
        yield {"item": item, "label": label, "key": key, "reason": reason}
