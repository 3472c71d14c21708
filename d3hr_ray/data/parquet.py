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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

from d3hr_ray.data.listing import (
    Listing,
    Shard,
    integer_label_ids,
    map_classes,
    probe_native_size,
    runs,
    select_classes,
)
from d3hr_ray.storage.fs import resolve

__all__ = ["ParquetShard", "hf_class_names", "list_parquet", "read_parquet"]

# Files whose footer and labels are read at once (S3 round trips overlap).
LIST_THREADS = 16


@dataclass(frozen=True, kw_only=True)
class ParquetShard(Shard):
    """Rows [start, stop) of one row group of one file."""

    kind: ClassVar[str] = "parquet"
    file: str
    row_group: int
    offset: int  # rows of the file before this row group (keys count rows in the file)
    column: str  # the label column: "label" (the data's int ids) or "class" (names)
    labels: dict[str, int]  # the column's value, as text -> the model's class id, for every class of the data
    valid: str  # what a value of the column must be, for the reason given to one that is not ("0..9")
    keep: tuple[int, ...]  # the model class ids this run reads (--classes); rows of others are left out


def _parquet_files(fs, path: str) -> list[str]:
    from pyarrow import fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(e.path for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(".parquet"))


def hf_class_names(schema) -> list[str] | None:
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


def _class_ids(
    col: str, counts: dict, hf_names, model_names, num_model_classes, class_map=None
) -> tuple[dict, dict, str]:
    """(class name -> model id, the column's value as text -> model id, the valid values in words)."""
    if col == "class":
        ids = map_classes(sorted(str(c) for c in counts if c is not None), model_names, num_model_classes, class_map)
        return ids, dict(ids), "the classes listed"
    return integer_label_ids(counts, hf_names, model_names, num_model_classes, class_map)


def _labels_of(fs, file: str) -> tuple:
    """(the file's Arrow schema, rows a row group, the label column's values: `class` if the file has it, else
    `label`, else []): the footer and the label column alone, its row groups fetched together (pre_buffer)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file, filesystem=fs, pre_buffer=True)
    schema = pf.schema_arrow
    col = "class" if "class" in schema.names else "label" if "label" in schema.names else None
    values = pf.read(columns=[col]).column(0).to_pylist() if col and "image" in schema.names else []
    return schema, [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], values


def list_parquet(
    uri: str, model_names, num_model_classes, classes, shard_size: int, label_names=None, class_map=None, output=None
) -> Listing:
    fs, path = resolve(uri)
    files = _parquet_files(fs, path)
    if not files:
        raise FileNotFoundError(f"--data {uri}: no .parquet files")
    metas, counts, hf_names, col = [], {}, None, None
    with ThreadPoolExecutor(min(LIST_THREADS, len(files))) as pool:  # footers and label columns, files at once
        found = list(pool.map(lambda f: _labels_of(fs, f), files))
    for f, (schema, groups, values) in zip(files, found, strict=True):
        cols = set(schema.names)
        if "image" not in cols or not ({"label", "class"} & cols):
            raise ValueError(
                f"--data {uri}: Parquet needs an 'image' column and a 'label' (int) or 'class' (str) "
                f"column; {f} has {sorted(cols)}"
            )
        this = "class" if "class" in cols else "label"
        if col is not None and this != col:
            raise ValueError(f"--data {uri}: some files label rows by 'class', others by 'label'; use one")
        col = this
        hf_names = hf_names or hf_class_names(schema)
        metas.append((f, groups))
        for v in values:
            counts[v] = counts.get(v, 0) + 1
    ids, labels, valid = _class_ids(col, counts, hf_names or label_names, model_names, num_model_classes, class_map)
    per_id: dict[int, int] = {}
    for v, k in counts.items():
        if v is not None and str(v) in labels:
            per_id[labels[str(v)]] = per_id.get(labels[str(v)], 0) + k
    names = select_classes(ids, classes)
    keep = tuple(sorted(names))
    shards = []
    for f, groups in metas:
        for g, rows in enumerate(groups):
            for start, stop in runs(rows, shard_size):
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
                        labels=labels,
                        valid=valid,
                        keep=keep,
                    )
                )
    native = probe_native_size(shards, read_parquet)
    return Listing("parquet", uri, names, {c: per_id.get(c, 0) for c in names}, shards, native)


def read_parquet(shard: ParquetShard) -> Iterator[dict]:
    """The shard's rows {item: the image cell, label, key, reason}; `keys_only` reads the label column alone."""
    import pyarrow.parquet as pq

    fs, path = resolve(shard.uri)
    pf = pq.ParquetFile(shard.file, filesystem=fs, pre_buffer=True)  # the row group's columns in one large read
    columns = [shard.column] if shard.keys_only else ["image", shard.column]
    table = pf.read_row_group(shard.row_group, columns=columns).slice(shard.start, shard.stop - shard.start)
    rel = posixpath.relpath(shard.file, path) if shard.file != path else posixpath.basename(path)
    keep = set(shard.keep)
    only = None if shard.only is None else set(shard.only)
    images = None if shard.keys_only else table.column("image")
    for i, value in enumerate(table.column(shard.column).to_pylist()):
        key = f"{rel}:{shard.offset + shard.start + i}"
        if only is not None and key not in only:
            continue
        if value is None:
            label, reason = -1, f"no {shard.column} (null)"
        elif str(value) not in shard.labels:
            label, reason = -1, f"{shard.column} {value} is outside {shard.valid}"
        elif shard.labels[str(value)] not in keep:
            continue  # a class this run does not distil (--classes): left out by request, not lost
        else:
            label, reason = shard.labels[str(value)], ""
        if shard.keys_only:
            yield {"item": None, "label": label, "key": key, "reason": reason}
            continue
        try:
            item = images[i].as_py()
        except Exception as e:  # an image cell pyarrow cannot turn into Python: report, never crash the shard
            item, reason = None, reason or f"unreadable image cell ({type(e).__name__})"
        if not reason and (item is None or (isinstance(item, dict) and item.get("bytes") is None)):
            reason = "no image data (null)"
        yield {"item": item, "label": label, "key": key, "reason": reason}
