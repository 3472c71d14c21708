"""Data sources: a deterministic listing cut into shards, a shard reader, and Ray Datasets built on them.

    list (driver, no image read) -> shards (fixed, ordered units of <= shard_size images)
        -> read_shard (any worker): rows {item, label, key, reason}
        -> read_batches (the job's read task): one row per fixed sub-batch, pixels decoded

Nothing here imports torch: a read task's worker process stays small (no torch, ~300 MB less) and
starts in a fraction of the time.

Every source yields rows {item, label, key, reason}: `item` is what `decode_image` reads (encoded
bytes, an HF-style struct, or a uint8 pixel array); `label` is the *model's* class id, or -1 for an
input that belongs to no distilled class (kept, with its `reason`, so that it is counted and
reported, never dropped); `key` identifies the image stably (its path under the root, or
`<file>:<row>` for Parquet) and seeds its VAE noise.

Shards are the unit of resumable work (`pipeline/state.py`): the same input and `shard_size` give
the same shards in the same order on every run, so a finished shard's partial statistics can be
reused. ImageFolder shards never span two classes (a class folder is listed, sorted, and cut into
runs of `shard_size` files); Parquet shards are row ranges of one row group; digits shards are runs
of indices. Reading a shard needs only its descriptor (a small JSON-able dict), so shards can be
read by any worker in any order.

Two optional descriptor fields narrow a read (the random-real baseline uses both, so that choosing 10
images a class of an S3 ImageNet does not download it): `keys_only` yields every row's label and key
and reads no image (ImageFolder opens no file, Parquet reads the label column alone); `only` (a list of
keys) yields just those rows, reading nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from d3hr_ray.data.preprocess import ImageError, convert_batch, image_size, to_pixels
from d3hr_ray.io.fs import resolve

__all__ = ["DEFAULT_SHARD_SIZE", "DIGITS_SPLITS", "Listing", "SOURCES", "Source", "digits_split", "list_source",
           "descriptor_dataset", "keys_dataset", "open_source", "per_class_subset", "read_shard", "rows_dataset", "shard_inputs",
           "source_kind"]

# 1,024 images a shard: ImageNet-1K's 1.28M images make about 2,000 shards (one state file each).
DEFAULT_SHARD_SIZE = 1024
# Images probed (in listing order) for the default output size.
_PROBE = 20
# ImageFolder: the file extensions read as images (lower case; PIL decodes them all). Any other file in a
# class folder (README.txt, labels.json, .DS_Store) is refused by the listing, reported, and never read.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


@dataclass(frozen=True)
class Listing:
    """What a source holds, from its listing alone (no image decoded but a few probes).

    Attributes:
        kind: 'imagefolder', 'parquet' or 'digits'.
        uri: the --data value.
        names: model class id -> class name, for the classes this run reads.
        counts: model class id -> inputs listed for it (files, rows); classes of `names` only.
        shards: ordered shard descriptors (JSON-able dicts with an int "id" = position).
        native_size: shorter side of the first readable image (the default output size), or None.
        skipped: inputs refused by the listing itself, as (location, reason).
        listed: for a listing narrowed to a subset (`per_class_subset`), the inputs listed before; else None.
    """

    kind: str
    uri: str
    names: dict[int, str]
    counts: dict[int, int]
    shards: list[dict]
    native_size: int | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    listed: int | None = None

    @property
    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the kind, the classes and how many inputs each has."""
        return {"kind": self.kind, "shards": len(self.shards),
                "counts": {self.names[c]: n for c, n in sorted(self.counts.items())}}


@dataclass(frozen=True)
class Source:
    """A readable data set as a Ray Dataset (for jobs that stream all of it: finetune, evaluate).

    Attributes:
        dataset: ray.data.Dataset of {item, label: int64, key: str, reason: str}.
        names, native_size, skipped: as in `Listing`.
    """

    kind: str
    dataset: object
    names: dict[int, str]
    native_size: int | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    listing: Listing | None = None


# -- classes ------------------------------------------------------------------------------------

def _map_classes(source_names: Sequence[str], model_names: Sequence[str] | None, num_model_classes: int | None) -> dict[str, int]:
    """Source class name -> model class id: by name when the model's id2label has them all, else by position.

    With no model yet (num_model_classes None: training one), the source's classes are the model's.
    """
    if num_model_classes is None:
        return {n: i for i, n in enumerate(source_names)}
    if model_names and set(source_names) <= set(model_names):
        return {n: list(model_names).index(n) for n in source_names}
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


def _runs(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] cutting range(n) into consecutive runs of at most `size`."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# -- ImageFolder --------------------------------------------------------------------------------

def is_image_name(path: str) -> bool:
    """Whether an ImageFolder file is read as an image: its extension is in IMAGE_EXTENSIONS (any case)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _class_files(fs, folder: str) -> tuple[list[str], list[str]]:
    """(images, others) under a class folder (recursive), each sorted: images are the order shards are cut in."""
    from pyarrow import fs as pafs

    entries = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File)
    return [p for p in files if is_image_name(p)], [p for p in files if not is_image_name(p)]


def _list_imagefolder(uri: str, model_names, num_model_classes, classes, shard_size: int) -> Listing:
    from pyarrow import fs as pafs

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
    ids = _map_classes(dirs, model_names, num_model_classes)
    names = _select(ids, classes)
    shards, counts, native = [], {}, None
    for cid, name in names.items():
        folder = posixpath.join(root, name)
        files, others = _class_files(fs, folder)  # listed once here for the counts; each shard task lists its folder again
        skipped += [(f"{base}/{posixpath.relpath(p, root)}", "not an image file extension") for p in others]
        counts[cid] = len(files)
        for start, stop in _runs(len(files), shard_size):
            shards.append({"id": len(shards), "kind": "imagefolder", "uri": uri, "root": root, "folder": folder,
                           "label": cid, "start": start, "stop": stop})
        if native is None:
            native = _probe(fs, files[:_PROBE])
    return Listing("imagefolder", uri, names, counts, shards, native, skipped)


def _probe(fs, paths: list[str]) -> int | None:
    for p in paths:
        try:
            with fs.open_input_stream(p) as f:
                return image_size(f.read())
        except (ImageError, OSError):
            continue
    return None


def _only(shard: dict) -> set[str] | None:
    """The keys a descriptor narrows its read to (`only`), or None for every row."""
    return set(shard["only"]) if "only" in shard else None


def _read_imagefolder(shard: dict) -> Iterator[dict]:
    fs, _ = resolve(shard["uri"])
    files = _class_files(fs, shard["folder"])[0][shard["start"] : shard["stop"]]
    if len(files) != shard["stop"] - shard["start"]:
        raise RuntimeError(f"{shard['folder']}: the folder changed since it was listed (files were removed)")
    only = _only(shard)
    for p in files:
        key = posixpath.relpath(p, shard["root"])
        if only is not None and key not in only:
            continue
        if shard.get("keys_only"):
            yield {"item": b"", "label": shard["label"], "key": key, "reason": ""}
            continue
        try:
            with fs.open_input_stream(p) as f:
                item, reason = f.read(), ""
        except OSError as e:
            item, reason = b"", f"cannot read the file ({type(e).__name__})"
        yield {"item": item, "label": shard["label"], "key": key, "reason": reason}


# -- Parquet ------------------------------------------------------------------------------------

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


def _list_parquet(uri: str, model_names, num_model_classes, classes, shard_size: int) -> Listing:
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    files = _parquet_files(fs, path)
    if not files:
        raise FileNotFoundError(f"--data {uri}: no .parquet files")
    metas, label_counts, class_counts, hf_names = [], {}, {}, None
    col = None
    for f in files:
        pf = pq.ParquetFile(f, filesystem=fs)
        cols = set(pf.schema_arrow.names)
        if "image" not in cols or not ({"label", "class"} & cols):
            raise ValueError(f"--data {uri}: Parquet needs an 'image' column and a 'label' (int) or 'class' (str) "
                             f"column; {f} has {sorted(cols)}")
        this = "class" if "class" in cols else "label"
        if col is not None and this != col:
            raise ValueError(f"--data {uri}: some files label rows by 'class', others by 'label'; use one")
        col = this
        hf_names = hf_names or hf_class_names(pf.schema_arrow)
        metas.append((f, [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]))
        # The label column alone (small) gives the per-class counts, one row group at a time.
        for i in range(pf.num_row_groups):
            values = pf.read_row_group(i, columns=[col]).column(0).to_pylist()
            counts = class_counts if col == "class" else label_counts
            for v in values:
                counts[v] = counts.get(v, 0) + 1
    if col == "class":
        src_names = sorted(str(c) for c in class_counts if c is not None)
        ids = _map_classes(src_names, model_names, num_model_classes)
        remap = None
        per_id = {ids[str(c)]: n for c, n in class_counts.items() if c is not None}
    else:
        # Labels are the data's own ids; named by the HF ClassLabel metadata when present. They map to the
        # model's ids by name when the model's id2label holds every name, else they are the model's ids.
        present = [int(v) for v in label_counts if v is not None]
        n_src = len(hf_names) if hf_names else (max(present, default=-1) + 1 if num_model_classes is None else num_model_classes)
        src_names = hf_names or [str(i) for i in range(n_src)]
        if num_model_classes is None:
            ids = {name: i for i, name in enumerate(src_names)}
        elif hf_names:
            ids = _map_classes(src_names, model_names, num_model_classes)
        else:
            ids = {(model_names[i] if model_names else str(i)): i for i in range(num_model_classes)}
            src_names = list(ids)
        remap = [ids[name] for name in src_names]
        per_id = {}
        for v, k in label_counts.items():
            if v is not None and 0 <= int(v) < len(remap):
                per_id[remap[int(v)]] = per_id.get(remap[int(v)], 0) + k
    names = _select(ids, classes)
    keep = sorted(names)
    id_of = {name: cid for cid, name in names.items()}
    shards = []
    for f, groups in metas:
        for g, rows in enumerate(groups):
            for start, stop in _runs(rows, shard_size):
                shards.append({"id": len(shards), "kind": "parquet", "uri": uri, "file": f, "row_group": g,
                               "offset": sum(groups[:g]), "start": start, "stop": stop, "col": col,
                               "ids": id_of if col == "class" else None, "remap": remap, "keep": keep})
    native = None
    for shard in shards[:1]:
        for row in _read_parquet(dict(shard, stop=min(shard["stop"], shard["start"] + _PROBE))):
            try:
                native = image_size(row["item"])
                break
            except ImageError:
                continue
    counts = {c: per_id.get(c, 0) for c in names}
    return Listing("parquet", uri, names, counts, shards, native)


def _read_parquet(shard: dict) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = resolve(shard["uri"])
    pf = pq.ParquetFile(shard["file"], filesystem=fs)
    keys_only = bool(shard.get("keys_only"))
    columns = [shard["col"]] if keys_only else ["image", shard["col"]]
    table = pf.read_row_group(shard["row_group"], columns=columns).slice(shard["start"], shard["stop"] - shard["start"])
    rel = posixpath.relpath(shard["file"], path) if shard["file"] != path else posixpath.basename(path)
    keep = set(shard["keep"])
    only = _only(shard)
    images = None if keys_only else table.column("image")
    values = table.column(shard["col"]).to_pylist()
    for i, value in enumerate(values):
        key = f"{rel}:{shard['offset'] + shard['start'] + i}"
        if only is not None and key not in only:
            continue
        if shard["col"] == "class":
            if value is None:
                label, reason = -1, "no class (null)"
            elif str(value) not in shard["ids"]:
                continue  # a class this run does not distil (--classes): left out by request, not lost
            else:
                label, reason = shard["ids"][str(value)], ""
        else:
            if value is None:
                label, reason = -1, "no label (null)"
            elif not 0 <= int(value) < len(shard["remap"]):
                label, reason = -1, f"label {int(value)} is outside 0..{len(shard['remap']) - 1}"
            elif shard["remap"][int(value)] not in keep:
                continue
            else:
                label, reason = shard["remap"][int(value)], ""
        if keys_only:
            yield {"item": None, "label": label, "key": key, "reason": reason}
            continue
        try:
            item = images[i].as_py()
        except Exception as e:  # an image cell pyarrow cannot turn into Python: report, never crash the shard
            item, reason = None, reason or f"unreadable image cell ({type(e).__name__})"
        if not reason and isinstance(item, dict) and item.get("bytes") is None:
            reason = "no image data (null)"
        if not reason and item is None:
            reason = "no image data (null)"
        yield {"item": item, "label": label, "key": key, "reason": reason}


# -- digits -------------------------------------------------------------------------------------

DIGITS_SPLITS = ("digits", "digits:train", "digits:test")


def digits_split(n: int, uri: str) -> np.ndarray:
    """(n,) bool: the images of 'digits' (all), 'digits:train' (3 of every 4) or 'digits:test' (every 4th, i % 4 == 3).

    A fixed split by position, for classifier training and testing (1,348 train, 449 test images).
    """
    if uri not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {uri!r}; use one of {', '.join(DIGITS_SPLITS)}")
    test = np.arange(n) % 4 == 3
    return {"digits": np.ones(n, dtype=bool), "digits:train": ~test, "digits:test": test}[uri]


def _digits_rows(uri: str, names: dict[int, str]) -> np.ndarray:
    """Indices of the digits this run reads, in order."""
    from d3hr_ray.data.digits import digits_rgb

    _, target = digits_rgb()
    keep = np.isin(target, [int(n) for n in names.values()]) & digits_split(len(target), uri)
    return np.flatnonzero(keep)


def _list_digits(uri: str, model_names, num_model_classes, classes, shard_size: int) -> Listing:
    from d3hr_ray.data.digits import digits_rgb

    rgb, target = digits_rgb()  # (N, 8, 8, 3), (N,)
    ids = _map_classes([str(i) for i in range(10)], model_names, num_model_classes)
    names = _select(ids, classes)
    rows = _digits_rows(uri, names)
    counts = {cid: int(np.sum(target[rows] == int(name))) for cid, name in names.items()}
    shards = [{"id": i, "kind": "digits", "uri": uri, "start": s, "stop": e, "ids": ids, "classes": sorted(names)}
              for i, (s, e) in enumerate(_runs(len(rows), shard_size))]
    return Listing("digits", uri, names, counts, shards, int(rgb.shape[1]))


def _read_digits(shard: dict) -> Iterator[dict]:
    from d3hr_ray.data.digits import digits_rgb

    rgb, target = digits_rgb()
    names = {cid: name for name, cid in shard["ids"].items() if cid in set(shard["classes"])}
    only = _only(shard)
    for i in _digits_rows(shard["uri"], names)[shard["start"] : shard["stop"]]:
        if only is not None and f"digits/{i}" not in only:
            continue
        yield {"item": rgb[i], "label": shard["ids"][str(int(target[i]))], "key": f"digits/{i}", "reason": ""}


# -- registry and entry points ------------------------------------------------------------------

# Registry: source kind -> (lister(uri, model_names, num_model_classes, classes, shard_size), shard reader).
SOURCES = {
    "digits": (_list_digits, _read_digits),
    "imagefolder": (_list_imagefolder, _read_imagefolder),
    "parquet": (_list_parquet, _read_parquet),
}


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


def list_source(uri: str, *, model_names: Sequence[str] | None, num_model_classes: int | None,
                classes: Sequence[str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE) -> Listing:
    """List `--data` (kind detected from what is there), labelled with the model's class ids, cut into shards."""
    kind = source_kind(uri)
    lister, _ = SOURCES[kind]
    return lister(uri, list(model_names) if model_names else None, num_model_classes, classes, shard_size)


def shard_inputs(shard: dict) -> int:
    """Inputs a shard descriptor reads: its `only` keys when narrowed, else its run of the listing."""
    return len(shard["only"]) if "only" in shard else shard["stop"] - shard["start"]


def per_class_subset(listing: Listing, per_class: int, seed: int) -> Listing:
    """The listing narrowed to `per_class` inputs of each class (all of a class that has fewer): a uniform
    random subset, `derive_seed(seed, "stats-subset", key)` ranks, the same whatever the shards or workers.

    A keys-only pass over every shard (no image read); the shards keep their ids (so their state files
    stay theirs), gain `only`, and a shard left with no chosen input is dropped. Counts are the subset's.
    """
    from d3hr_ray.data.subset import lowest_ranked

    def keys():
        for shard in listing.shards:
            rows = list(read_shard(dict(shard, keys_only=True)))
            yield {"label": np.array([r["label"] for r in rows], dtype=np.int64), "key": [r["key"] for r in rows],
                   "shard": np.full(len(rows), shard["id"], dtype=np.int64)}

    chosen, _ = lowest_ranked(keys(), per_class, seed, "stats-subset")
    by_shard: dict[int, list[str]] = {}
    counts = dict.fromkeys(listing.counts, 0)
    for key, (label, shard) in chosen.items():
        by_shard.setdefault(shard, []).append(key)
        counts[label] = counts.get(label, 0) + 1
    shards = [dict(s, only=sorted(by_shard[s["id"]])) for s in listing.shards if s["id"] in by_shard]
    return dataclasses.replace(listing, shards=shards, counts=counts, listed=sum(listing.counts.values()))


def read_shard(shard: dict) -> Iterator[dict]:
    """The rows {item, label, key, reason} of one shard, in listing order (narrowed by `keys_only`, `only`)."""
    return SOURCES[shard["kind"]][1](shard)


def _read_keys_batch(batch: dict) -> dict:
    """Ray Data task: shard descriptors (JSON) -> {label, key, shard id} of their rows; no image is read."""
    rows = [(r["label"], r["key"], s["id"]) for s in map(json.loads, batch["shard"]) for r in read_shard(dict(s, keys_only=True))]
    return {"label": np.array([r[0] for r in rows], dtype=np.int64), "key": np.array([r[1] for r in rows], dtype=object),
            "shard": np.array([r[2] for r in rows], dtype=np.int64)}


def keys_dataset(shards: list[dict]):
    """A Ray Dataset of every row's {label, key, shard} (one task per shard), reading no image."""
    return descriptor_dataset(shards).map_batches(_read_keys_batch, batch_size=1, batch_format="numpy")


def _read_shards_batch(batch: dict) -> dict:
    """Ray Data task: shard descriptors (JSON) -> their rows, each with its shard id."""
    rows = [(r, s["id"]) for s in map(json.loads, batch["shard"]) for r in read_shard(s)]
    items = np.empty(len(rows), dtype=object)
    items[:] = [r["item"] for r, _ in rows]
    return {"item": items, "label": np.array([r["label"] for r, _ in rows], dtype=np.int64),
            "key": np.array([r["key"] for r, _ in rows], dtype=object), "reason": np.array([r["reason"] for r, _ in rows], dtype=object),
            "shard": np.array([i for _, i in rows], dtype=np.int64)}


def descriptor_dataset(shards: list[dict]):
    """A Ray Dataset of shard descriptors {shard: JSON}, one block each (so each is read by its own task)."""
    import ray

    return ray.data.from_items([{"shard": json.dumps(s)} for s in shards], override_num_blocks=max(1, len(shards)))


def rows_dataset(shards: list[dict]):
    """A Ray Dataset reading `shards` (one read task per shard): rows {item, label, key, reason, shard (its id)}."""
    return descriptor_dataset(shards).map_batches(_read_shards_batch, batch_size=1, batch_format="numpy")


def open_source(uri: str, *, model_names: Sequence[str] | None, num_model_classes: int | None,
                classes: Sequence[str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE) -> Source:
    """`--data` as a Ray Dataset of rows {item, label, key, reason} (every listed input, refused ones with a reason)."""
    listing = list_source(uri, model_names=model_names, num_model_classes=num_model_classes, classes=classes, shard_size=shard_size)
    return Source(listing.kind, rows_dataset(listing.shards), listing.names, listing.native_size, listing.skipped, listing)


def read_batches(batch: dict, *, resolution: int, batch_size: int):
    """CPU task: shard descriptors (JSON) -> one row per fixed sub-batch of `batch_size` inputs.

    Inputs refused here (unreadable, corrupt, outside any class) leave the sub-batch and are listed
    in its meta with their reason; `read` counts every input of a distilled class, refused or not.
    Yields:
        {shard: (1,) int64, part: (1,) int64, parts: (1,) int64, pixels: (1,) bytes of (n, 3, R, R) uint8, meta: (1,) JSON}
    """
    for text in batch["shard"]:
        shard = json.loads(text)
        rows = list(read_shard(shard))  # at most shard_size encoded images
        cuts = [(s, min(s + batch_size, len(rows))) for s in range(0, len(rows), batch_size)] or [(0, 0)]
        for part, (a, b) in enumerate(cuts):
            chunk = rows[a:b]
            labels = np.array([r["label"] for r in chunk], dtype=np.int64)
            pixels, reasons = convert_batch([r["item"] for r in chunk], labels, lambda it: to_pixels(it, resolution),
                                            (3, resolution, resolution), np.uint8, unlabelled="not in a class of --data")
            reasons = [r["reason"] or why for r, why in zip(chunk, reasons)]
            ok = [i for i, why in enumerate(reasons) if not why]
            read: dict[int, int] = {}
            for y in labels[labels >= 0].tolist():
                read[y] = read.get(y, 0) + 1
            meta = {"labels": [int(labels[i]) for i in ok], "keys": [chunk[i]["key"] for i in ok], "read": read,
                    "skipped": [[chunk[i]["key"], int(labels[i]), reasons[i]] for i in range(len(chunk)) if reasons[i]]}
            yield {"shard": np.array([shard["id"]], dtype=np.int64), "part": np.array([part], dtype=np.int64),
                   "parts": np.array([len(cuts)], dtype=np.int64),
                   "pixels": np.array([np.ascontiguousarray(pixels[ok]).tobytes()], dtype=object),
                   "meta": np.array([json.dumps(meta)], dtype=object)}
