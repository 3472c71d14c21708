"""WebDataset sources: samples stored as consecutive members of uncompressed .tar shards, local or s3://.

    --data  a folder or prefix of .tar files, one .tar file, a brace pattern (shards-{000000..000127}.tar),
            or a wids index (a .json file of kind "wids-shard-index-v1" whose "shardlist" names the tars)

A sample is the run of consecutive members that share a key (the member's path up to the first "." of its
file name): its label is the integer in `<key>.cls`, else the `label` field of `<key>.json`; its image is
the first of jpg, jpeg, png, webp. Labels are the data's own ids, named by `--class-names FILE` (one name
a line) or a `classes.txt` beside the shards, else by their numbers; they map to the model's classes as
Parquet's integer labels do (`listing.integer_label_ids`).

The listing reads tar headers and the small label members only, and decodes no image. Tars are listed in
parallel (LIST_THREADS), each through a reader that fetches READ_BLOCK bytes a request (`storage.fs.open_ranged`),
so a tar of small samples costs size / 8 MiB requests, not one a header. Each tar's listing (the header offset
and label of every sample) is a `TarIndex`: kept, with the job's output, under `_state/index/` (a rerun or a
resume lists no tar twice), and read from a wids index's entries when they carry it (`"d3hr": {offsets,
labels}`, as the cache writes them). An index entry that disagrees with its tar (size, sample count) is refused
by name in `skipped` and the tar is listed instead. A shard is a run of `shard_size` samples of one tar with
the byte offset of its first header, so any worker reads it without scanning the tar from its start.
Keys are `<tar path under the root>/<sample key>`. A sample without an image or a label, with a label outside
the data's classes, or with an image that does not decode keeps its place with a reason; a tar cut short
(inside a member, or in a header) is listed as skipped ("truncated tar") after its last whole sample.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, ClassVar

from pyarrow import fs as pafs

from d3hr_ray.data.labels import LabelledShard, count_integer_labels
from d3hr_ray.data.listing import LabelValue, Listing, ListRequest, Shard, probe_native_size, runs
from d3hr_ray.storage.fs import OutputDir, open_ranged, read_object, resolve
from d3hr_ray.storage.s3 import is_s3

__all__ = [
    "CLASSES_FILE",
    "IMAGE_EXTENSIONS",
    "INDEX_DIR",
    "TarIndex",
    "WebDatasetShard",
    "expand_braces",
    "list_webdataset",
    "read_webdataset",
]

# A sample's image: the first of these member extensions it has.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# The file beside the shards that names the integer labels, one name a line, in label order.
CLASSES_FILE = "classes.txt"
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
# The tar format's block: headers and the end-of-archive marker are 512-byte blocks.
_BLOCK = 512
# Tars listed at once: S3 round trips overlap (each thread holds one READ_BLOCK buffer, 8 MiB).
LIST_THREADS = 16
# Where the listing keeps each tar's index, under the job's output.
INDEX_DIR = "_state/index"
# The JSON index format of WebDataset's `wids` (a tar's entry: url, nsamples, filesize); ours adds "d3hr".
WIDS_KIND = "wids-shard-index-v1"


@dataclass(frozen=True, kw_only=True)
class WebDatasetShard(LabelledShard):
    """Samples [start, stop) of one tar, by sample index in the tar; `offset` is the byte offset of the header of
    sample `start`'s first member."""

    kind: ClassVar[str] = "webdataset"
    root: str  # the shards' folder or prefix, a path in the filesystem of `uri` (keys are tar paths under it)
    tar: str  # the tar file, likewise
    offset: int


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


def _filesystem(uri: str) -> pafs.FileSystem:
    return resolve(expand_braces(uri)[0])[0]


def _split(name: str) -> tuple[str, str]:
    """A member's (sample key, extension): its path up to the first '.' of its file name, and the rest."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


class TruncatedTar(tarfile.ReadError):
    """A tar that ends inside a member's data or inside a header."""


def _samples(
    f: IO[bytes], size: int, start: int = 0
) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile, int]]:
    """(key, {extension: TarInfo}, its TarFile, the byte offset of its first header) per sample, from byte `start`.

    Only headers are read (the TarFile seeks past member data). Raises TruncatedTar when the file ends inside a
    member or a header: the samples yielded before are whole.
    """
    f.seek(start)
    tf = tarfile.open(fileobj=f, mode="r:")
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    first = start
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


def _member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes (`_samples` yields regular files only: those extractfile opens)."""
    f = tf.extractfile(member)
    if f is None:
        raise ValueError(f"{member.name} is not a regular file")
    return f.read()


def _label_of(members: dict[str, tarfile.TarInfo], tf: tarfile.TarFile) -> int | None:
    """The sample's integer label from `.cls` or `.json`'s "label"; None without one; ValueError if unreadable."""
    if "cls" in members:
        return int(_member(tf, members["cls"]).decode().strip())
    if "json" in members:
        value = json.loads(_member(tf, members["json"])).get("label")
        return None if value is None else int(value)
    return None


def _tars(fs: pafs.FileSystem, uri: str) -> tuple[str, list[pafs.FileInfo], dict[str, dict]]:
    """(root: the folder the keys are relative to, the tars' pyarrow FileInfos in order, a wids index's entries
    by tar path: {} without one)."""
    if is_pattern(uri):
        paths = [resolve(u)[1] for u in expand_braces(uri)]
        return posixpath.dirname(paths[0]), _existing(fs, uri, paths, "shard(s) of the pattern"), {}
    _, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        if path.endswith(".json"):
            root, entries = _wids_entries(fs, uri, path)
            return root, _existing(fs, uri, list(entries), "tar(s) of the index"), entries
        if not path.endswith(".tar"):
            raise ValueError(f"--data {uri}: a WebDataset shard must be an uncompressed .tar (or a wids .json index)")
        return posixpath.dirname(path), fs.get_file_info([path]), {}
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    tars = [e for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(".tar")]
    tars.sort(key=lambda e: e.path)
    if not tars:
        raise FileNotFoundError(f"--data {uri}: no .tar shards")
    return path, tars, {}


def _existing(fs: pafs.FileSystem, uri: str, paths: list[str], what: str) -> list[pafs.FileInfo]:
    """The FileInfos of `paths` (one request each on S3); FileNotFoundError naming the first that is missing."""
    found = fs.get_file_info(paths)
    missing = [p for p, info in zip(paths, found, strict=True) if info.type != pafs.FileType.File]
    if missing:
        raise FileNotFoundError(f"--data {uri}: {len(missing)} {what} do not exist (first: {missing[0]})")
    return found


def _wids_entries(fs: pafs.FileSystem, uri: str, path: str) -> tuple[str, dict[str, dict]]:
    """A wids index's (folder, {tar path: its entry}); a relative "url" is relative to the index's folder."""
    try:
        doc = json.loads(read_object(fs, path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {uri}: not a JSON wids index ({e})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("wids_version") != 1
        or doc.get("__kind__", WIDS_KIND) != WIDS_KIND
        or not isinstance(doc.get("shardlist"), list)
    ):
        raise ValueError(f'--data {uri}: a .json --data must be a wids index ("wids_version": 1, "shardlist")')
    if doc.get("datasets"):
        raise ValueError(f'--data {uri}: nested wids "datasets" are not read; list their tars in "shardlist"')
    root = posixpath.dirname(path)
    entries: dict[str, dict] = {}
    for entry in doc["shardlist"]:
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url.endswith(".tar"):
            raise ValueError(f"--data {uri}: every shardlist entry needs a .tar url; found {entry!r:.200}")
        if "://" in url:
            full = resolve(url)[1]
        else:
            full = posixpath.normpath(url if url.startswith("/") else posixpath.join(root, url))
        entries[full] = entry
    if not entries:
        raise FileNotFoundError(f"--data {uri}: the index's shardlist is empty")
    return root, entries


@dataclass(frozen=True)
class TarIndex:
    """One tar's listing: each whole sample's header offset and label, in tar order.

    Attributes:
        size: the tar's bytes when listed.
        offsets: the byte offset of each sample's first header (ascending).
        labels: each sample's integer label, or None (none, or unreadable: the shard reader gives the reason).
        truncated: why the tar ends before its end-of-archive marker ("" for a whole tar).
    """

    size: int
    offsets: tuple[int, ...]
    labels: tuple[int | None, ...]
    truncated: str = ""

    def entry(self, url: str) -> dict:
        """The tar's wids shardlist entry, with the listing under "d3hr"."""
        d3hr = {"offsets": list(self.offsets), "labels": list(self.labels), "truncated": self.truncated}
        return {"url": url, "nsamples": len(self.offsets), "filesize": self.size, "d3hr": d3hr}

    @classmethod
    def from_entry(cls, e: dict, size: int) -> TarIndex:
        """The listing in a wids entry for a tar of `size` bytes; ValueError saying how they disagree."""
        d = e.get("d3hr")
        if not isinstance(d, dict) or not isinstance(d.get("offsets"), list) or not isinstance(d.get("labels"), list):
            raise ValueError("the entry has no sample offsets and labels")
        offsets, labels = tuple(d["offsets"]), tuple(d["labels"])
        if e.get("filesize") != size:
            raise ValueError(f"the index says {e.get('filesize')} bytes, the tar has {size}")
        if not (len(offsets) == len(labels) == e.get("nsamples")):
            raise ValueError(f"nsamples {e.get('nsamples')} but {len(offsets)} offsets and {len(labels)} labels")
        if not all(isinstance(o, int) and 0 <= o < size and o % _BLOCK == 0 for o in offsets) or any(
            b <= a for a, b in zip(offsets, offsets[1:], strict=False)
        ):
            raise ValueError("its offsets are not ascending header positions inside the tar")
        if not all(v is None or isinstance(v, int) for v in labels):
            raise ValueError("its labels are not integers (or null)")
        return cls(size, offsets, labels, str(d.get("truncated", "")))

    def check(self, e: dict) -> str:
        """How a plain wids entry (nsamples, filesize) disagrees with this listing of its tar; "" if it does not."""
        if "filesize" in e and e["filesize"] != self.size:
            return f"the index says {e['filesize']} bytes, the tar has {self.size}"
        if "nsamples" in e and e["nsamples"] != len(self.offsets):
            return f"the index says {e['nsamples']} samples, the tar has {len(self.offsets)}"
        return ""


def index_tar(fs: pafs.FileSystem, tar: str) -> TarIndex:
    """List one tar: headers and label members only, through a reader that fetches READ_BLOCK bytes a request."""
    offsets: list[int] = []
    labels: list[int | None] = []
    with open_ranged(fs, tar) as f:
        size = f.raw.size()
        try:
            for _, members, tf, offset in _samples(f, size):
                try:
                    label = _label_of(members, tf)
                except (ValueError, UnicodeDecodeError):
                    label = None  # read again, with its reason, by the shard reader
                offsets.append(offset)
                labels.append(label)
        except tarfile.ReadError as e:
            return TarIndex(size, tuple(offsets), tuple(labels), f"truncated tar after {len(offsets)} samples ({e})")
    return TarIndex(size, tuple(offsets), tuple(labels))


def _cache_name(fs: pafs.FileSystem, info: pafs.FileInfo) -> str:
    """A tar's file under INDEX_DIR: a hash of where it is, its size and its modification time (whole seconds)."""
    mtime = int(info.mtime.timestamp()) if info.mtime is not None else 0
    where = f"{fs.type_name}:{info.path}\t{info.size}\t{mtime}"
    return f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"


def _index_all(
    fs: pafs.FileSystem, uri: str, infos: list[pafs.FileInfo], wids: dict[str, dict], output: str | None
) -> tuple[list[TarIndex], list[tuple[str, str]]]:
    """(a TarIndex per tar in order, (location, reason) for each index entry refused): from the cache under the
    output, else from the wids index's entry, else by listing the tar (in parallel); new listings are cached."""
    cache = OutputDir(output) if output else None
    found: dict[str, TarIndex] = {}
    refused: list[tuple[str, str]] = []
    if cache is not None:
        cached = set(cache.list(INDEX_DIR))
        hits = [info for info in infos if _cache_name(fs, info) in cached]
    else:
        hits = []
    if cache is not None and hits:  # a request each on S3: made at once
        with ThreadPoolExecutor(min(LIST_THREADS, len(hits))) as pool:
            texts = list(pool.map(lambda info: cache.read(f"{INDEX_DIR}/{_cache_name(fs, info)}"), hits))
        for info, text in zip(hits, texts, strict=True):
            try:
                (e,) = json.loads(text)["shardlist"]
                found[info.path] = TarIndex.from_entry(e, info.size)
            except (ValueError, KeyError, TypeError):
                pass  # a cache file of another version: the tar is listed again and the file replaced
    for info in infos:
        if info.path not in found and "d3hr" in wids.get(info.path, {}):
            try:
                found[info.path] = TarIndex.from_entry(wids[info.path], info.size)
            except ValueError as e:
                refused.append((_index_location(uri, info.path), f"refused: {e}; the tar was listed instead"))
    todo = [info for info in infos if info.path not in found]
    if todo:
        with ThreadPoolExecutor(min(LIST_THREADS, len(todo))) as pool:
            listed = list(pool.map(lambda info: index_tar(fs, info.path), todo))
        for info, index in zip(todo, listed, strict=True):
            found[info.path] = index
            if cache is not None and index.size == info.size:
                doc = {
                    "__kind__": WIDS_KIND,
                    "wids_version": 1,
                    "shardlist": [index.entry(f"s3://{info.path}" if is_s3(uri) else info.path)],
                }  # itself a wids index of one tar, readable by --data
                cache.write_bytes(f"{INDEX_DIR}/{_cache_name(fs, info)}", json.dumps(doc).encode())
    for info in infos:  # a plain wids entry (nsamples, filesize) is checked against the tar's listing
        why = found[info.path].check(wids.get(info.path, {}))
        if why and "d3hr" not in wids[info.path]:
            refused.append((_index_location(uri, info.path), f"refused: {why}; the tar was listed instead"))
    return [found[info.path] for info in infos], refused


def _index_location(uri: str, tar: str) -> str:
    """An index entry, named for `skipped`: the index and the tar's file name."""
    return f"{uri} (entry {posixpath.basename(tar)})"


def _names(fs: pafs.FileSystem, root: str, label_names: list[str] | None) -> list[str] | None:
    """The labels' names: --class-names, else classes.txt beside the shards, else None."""
    if label_names:
        return list(label_names)
    try:
        return [
            line.strip()
            for line in read_object(fs, posixpath.join(root, CLASSES_FILE)).decode().splitlines()
            if line.strip()
        ]
    except OSError:  # no such file (FileNotFoundError), or none readable
        return None


def list_webdataset(uri: str, ask: ListRequest) -> Listing:
    """`ask.output`: the job's output folder (local or s3://), where each tar's index is kept (INDEX_DIR), or None."""
    fs = _filesystem(uri)
    root, infos, wids = _tars(fs, uri)
    indexes, skipped = _index_all(fs, uri, infos, wids, ask.output)
    values: Counter[LabelValue] = Counter()
    for info, index in zip(infos, indexes, strict=True):
        values.update(index.labels)
        if index.truncated:
            skipped.append((f"{uri.rstrip('/')}/{posixpath.relpath(info.path, root)}", index.truncated))
    found = count_integer_labels(values, _names(fs, root, ask.label_names), ask)
    shards: list[Shard] = []
    for info, index in zip(infos, indexes, strict=True):
        for start, stop in runs(len(index.offsets), ask.shard_size):
            shards.append(
                WebDatasetShard(
                    id=len(shards),
                    uri=uri,
                    root=root,
                    tar=info.path,
                    offset=index.offsets[start],
                    start=start,
                    stop=stop,
                    **found.shard,
                )
            )
    native = probe_native_size(shards, read_webdataset)
    return Listing("webdataset", uri, found.names, found.counts, shards, native, skipped)


def read_webdataset(shard: WebDatasetShard) -> Iterator[dict]:
    """The shard's rows {item: image bytes, label, key, reason}; `keys_only` reads no image member."""
    fs = _filesystem(shard.uri)
    rel = posixpath.relpath(shard.tar, shard.root)
    only = None if shard.only is None else set(shard.only)
    found = 0
    with open_ranged(fs, shard.tar) as f:  # READ_BLOCK bytes a request: a shard of small samples in a few
        samples = _samples(f, f.raw.size(), shard.offset)
        for _, (key, members, tf, _) in zip(range(shard.stop - shard.start), samples, strict=False):
            found += 1
            full = f"{rel}/{key}"
            if only is not None and full not in only:
                continue
            try:
                labelled = shard.label_of(_label_of(members, tf), missing=".cls or .json")
            except (ValueError, UnicodeDecodeError):
                labelled = -1, "unreadable label (.cls or .json)"
            if labelled is None:
                continue  # a class this run does not distil (--classes): left out by request, not lost
            label, reason = labelled
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if not reason and image is None:
                reason = "no image (jpg, jpeg, png or webp)"
            item = b""
            if image is not None and not (shard.keys_only or reason):
                item = _member(tf, image)
            yield {"item": item, "label": label, "key": full, "reason": reason}
    if found < shard.stop - shard.start:  # a tar that changed since it was listed, or a wrong index: never lose rows
        raise OSError(
            f"{shard.tar}: {found} samples from byte {shard.offset}, the listing found {shard.stop - shard.start}: "
            "the tar changed since it was listed (or its index is wrong)"
        )
