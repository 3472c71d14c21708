"""WebDataset sources: samples stored as consecutive members of uncompressed .tar shards, local or s3://.

    --data  a folder or prefix of .tar files, one .tar file, or a brace pattern (shards-{000000..000127}.tar)

A sample is the run of consecutive members that share a key (the member's path up to the first "." of its
file name): its label is the integer in `<key>.cls`, else the `label` field of `<key>.json`; its image is
the first of jpg, jpeg, png, webp. Labels are the data's own ids, named by `--class-names FILE` (one name
a line) or a `classes.txt` beside the shards, else by their numbers; they map to the model's classes as
Parquet's integer labels do (`listing.integer_label_ids`).

The listing reads tar headers and the small label members only: it seeks past every other member's data
(a ranged read per header on S3) and decodes no image. A shard is a run of `shard_size` samples of one tar
with the byte offset of its first header, so any worker reads it without scanning the tar from its start.
Keys are `<tar path under the root>/<sample key>`. A sample without an image or a label, with a label outside
the data's classes, or with an image that does not decode keeps its place with a reason; a tar cut short
(inside a member, or in a header) is listed as skipped ("truncated tar") after its last whole sample.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from d3hr_ray.data.listing import Listing, Shard, integer_label_ids, probe_native_size, runs, select_classes
from d3hr_ray.io.fs import resolve

__all__ = ["CLASSES_FILE", "IMAGE_EXTENSIONS", "WebDatasetShard", "expand_braces", "list_webdataset", "read_webdataset"]

# A sample's image: the first of these member extensions it has.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# The file beside the shards that names the integer labels, one name a line, in label order.
CLASSES_FILE = "classes.txt"
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
# The tar format's block: headers and the end-of-archive marker are 512-byte blocks.
_BLOCK = 512


@dataclass(frozen=True, kw_only=True)
class WebDatasetShard(Shard):
    """Samples [start, stop) of one tar, by sample index in the tar; `offset` is the byte offset of the header of
    sample `start`'s first member."""

    kind: ClassVar[str] = "webdataset"
    root: str  # the shards' folder or prefix, a path in the filesystem of `uri` (keys are tar paths under it)
    tar: str  # the tar file, likewise
    offset: int
    labels: dict[str, int]  # the label as text -> the model's class id, for every class of the data
    valid: str  # what a label must be, for the reason given to one that is not ("0..9")
    keep: tuple[int, ...]  # the model class ids this run reads (--classes)


def expand_braces(pattern: str) -> list[str]:
    """shards-{000000..000002}.tar -> [shards-000000.tar, shards-000001.tar, shards-000002.tar] (a number keeps the
    width of its first bound; several ranges multiply)."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"--data {pattern}: the range {{{lo}..{hi}}} runs backwards")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for i in range(int(lo), int(hi) + 1) for x in expand_braces(head + str(i).zfill(len(lo)) + tail)]


def is_pattern(uri: str) -> bool:
    return _BRACES.search(uri) is not None


def _filesystem(uri: str):
    return resolve(expand_braces(uri)[0])[0]


def _tars(fs, uri: str) -> tuple[str, list[str]]:
    """(root: the folder the keys are relative to, the tar paths in order)."""
    from pyarrow import fs as pafs

    if is_pattern(uri):
        paths = [resolve(u)[1] for u in expand_braces(uri)]
        found = fs.get_file_info(paths)
        missing = [p for p, info in zip(paths, found, strict=True) if info.type != pafs.FileType.File]
        if missing:
            raise FileNotFoundError(
                f"--data {uri}: {len(missing)} shard(s) of the pattern do not exist (first: {missing[0]})"
            )
        return posixpath.dirname(paths[0]), paths
    _, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        if not path.endswith(".tar"):
            raise ValueError(f"--data {uri}: a WebDataset shard must be an uncompressed .tar")
        return posixpath.dirname(path), [path]
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    tars = sorted(e.path for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(".tar"))
    if not tars:
        raise FileNotFoundError(f"--data {uri}: no .tar shards")
    return path, tars


def _split(name: str) -> tuple[str, str]:
    """A member's (sample key, extension): its path up to the first '.' of its file name, and the rest."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


class TruncatedTar(tarfile.ReadError):
    """A tar that ends inside a member's data or inside a header."""


def _samples(f, size: int, start: int = 0) -> Iterator[tuple[str, dict, tarfile.TarFile, int]]:
    """(key, {extension: TarInfo}, its TarFile, the byte offset of its first header) per sample, from byte `start`.

    Only headers are read (the TarFile seeks past member data). Raises TruncatedTar when the file ends inside a
    member or a header: the samples yielded before are whole.
    """
    f.seek(start)
    tf = tarfile.open(fileobj=f, mode="r:")
    key, members, first = None, {}, start
    for m in tf:
        if not m.isfile():
            continue
        k, ext = _split(m.name)
        if k != key:
            if key is not None:
                yield key, members, tf, first
            key, members, first = k, {}, m.offset
        if m.offset_data + m.size > size:
            raise TruncatedTar(f"{m.name} ends past the end of the file")
        members.setdefault(ext, m)
    if key is not None:
        yield key, members, tf, first  # its members are whole: each was checked against the file's size
    # tarfile ends quietly at a header cut short: whatever follows the last member must be the zero blocks.
    f.seek(tf.offset)
    rest = f.read(min(size - tf.offset, 16 * _BLOCK))
    if any(rest):
        raise TruncatedTar(f"{size - tf.offset} bytes after the last whole member are not an end-of-archive marker")


def _label_of(members: dict, tf: tarfile.TarFile) -> int | None:
    """The sample's integer label from `.cls` or `.json`'s "label"; None without one; ValueError if unreadable."""
    if "cls" in members:
        return int(tf.extractfile(members["cls"]).read().decode().strip())
    if "json" in members:
        value = json.loads(tf.extractfile(members["json"]).read()).get("label")
        return None if value is None else int(value)
    return None


def _names(fs, root: str, label_names) -> list[str] | None:
    """The labels' names: --class-names, else classes.txt beside the shards, else None."""
    if label_names:
        return list(label_names)
    try:
        with fs.open_input_stream(posixpath.join(root, CLASSES_FILE)) as f:
            return [line.strip() for line in f.read().decode().splitlines() if line.strip()]
    except OSError:  # no such file (FileNotFoundError), or none readable
        return None


def list_webdataset(uri: str, model_names, num_model_classes, classes, shard_size: int, label_names=None) -> Listing:
    fs = _filesystem(uri)
    root, tars = _tars(fs, uri)
    counts: dict[int | None, int] = {}
    per_tar: list[tuple[str, list[int]]] = []  # (tar, the header offset of each whole sample)
    skipped: list[tuple[str, str]] = []
    for tar in tars:
        offsets: list[int] = []
        with fs.open_input_file(tar) as f:
            try:
                for _, members, tf, offset in _samples(f, f.size()):
                    offsets.append(offset)
                    try:
                        label = _label_of(members, tf)
                    except (ValueError, UnicodeDecodeError):
                        label = None  # read again, with its reason, by the shard reader
                    counts[label] = counts.get(label, 0) + 1
            except tarfile.ReadError as e:
                skipped.append(
                    (
                        f"{uri.rstrip('/')}/{posixpath.relpath(tar, root)}",
                        f"truncated tar after {len(offsets)} samples ({e})",
                    )
                )
        per_tar.append((tar, offsets))
    ids, labels, valid = integer_label_ids(counts, _names(fs, root, label_names), model_names, num_model_classes)
    names = select_classes(ids, classes)
    keep = tuple(sorted(names))
    per_id: dict[int, int] = {}
    for v, k in counts.items():
        if v is not None and str(v) in labels:
            per_id[labels[str(v)]] = per_id.get(labels[str(v)], 0) + k
    shards = []
    for tar, offsets in per_tar:
        for start, stop in runs(len(offsets), shard_size):
            shards.append(
                WebDatasetShard(
                    id=len(shards),
                    uri=uri,
                    root=root,
                    tar=tar,
                    offset=offsets[start],
                    start=start,
                    stop=stop,
                    labels=labels,
                    valid=valid,
                    keep=keep,
                )
            )
    native = probe_native_size(shards, read_webdataset)
    return Listing("webdataset", uri, names, {c: per_id.get(c, 0) for c in names}, shards, native, skipped)


def read_webdataset(shard: WebDatasetShard) -> Iterator[dict]:
    """The shard's rows {item: image bytes, label, key, reason}; `keys_only` reads no image member."""
    fs = _filesystem(shard.uri)
    rel = posixpath.relpath(shard.tar, shard.root)
    only = None if shard.only is None else set(shard.only)
    keep = set(shard.keep)
    with fs.open_input_file(shard.tar) as f:
        samples = _samples(f, f.size(), shard.offset)
        for _, (key, members, tf, _) in zip(range(shard.stop - shard.start), samples, strict=False):
            full = f"{rel}/{key}"
            if only is not None and full not in only:
                continue
            try:
                value, reason = _label_of(members, tf), ""
            except (ValueError, UnicodeDecodeError):
                value, reason = None, "unreadable label (.cls or .json)"
            if reason or value is None:
                label, reason = -1, reason or "no label (.cls or .json)"
            elif str(value) not in shard.labels:
                label, reason = -1, f"label {value} is outside {shard.valid}"
            elif shard.labels[str(value)] not in keep:
                continue  # a class this run does not distil (--classes): left out by request, not lost
            else:
                label = shard.labels[str(value)]
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if not reason and image is None:
                reason = "no image (jpg, jpeg, png or webp)"
            item = b""
            if not (shard.keys_only or reason):
                item = tf.extractfile(image).read()
            yield {"item": item, "label": label, "key": full, "reason": reason}
