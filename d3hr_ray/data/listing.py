"""What every source kind shares: the `Listing` of a data set, the `Shard` record, and the class mapping.

A shard is the unit of resumable work: a fixed run of one source's inputs, readable by any worker from
its record alone. Each kind's record is a frozen dataclass (data/imagefolder.py, parquet.py, webdataset.py,
hf_disk.py, digits.py) that travels as JSON (`to_json`, `sources.shard_from_json`), so Ray tasks carry a few
hundred bytes, not images. Two fields narrow any read: `keys_only` (labels and keys, no image) and `only` (just
these keys). Nothing here imports torch or Ray.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

from d3hr_ray.data.preprocess import ImageError, image_size

__all__ = [
    "CLASS_MAP_HELP",
    "CLASS_NAMES_HELP",
    "DEFAULT_SHARD_SIZE",
    "IMAGENET_CLASSES",
    "PROBE",
    "WNID",
    "LabelValue",
    "ListRequest",
    "Listing",
    "Shard",
    "imagenet_wnids",
    "integer_label_ids",
    "map_classes",
    "probe_native_size",
    "runs",
    "select_classes",
]

# 1,024 images a shard: ImageNet-1K's 1.28M images make about 2,000 shards (one state file each).
DEFAULT_SHARD_SIZE = 1024
# Images probed (in listing order) for the default output size.
PROBE = 20
# ImageNet-1K's classes: a model with this many classes maps WordNet-id class names by the ILSVRC-2012 order.
IMAGENET_CLASSES = 1000
# A WordNet noun id, as ImageNet names its class folders (n01440764).
WNID = re.compile(r"n\d{8}")
# A label as the data stores it: an integer id, a class name, or None where a row has none.
LabelValue = int | str | None
# --class-map, as distill describes it.
CLASS_MAP_HELP = (
    "a CSV (data class,model class; no header) or JSON object file, local or s3://, sending each data class to a "
    "model class id or name (default: by the model's class names; ImageNet WordNet ids such as n01440764 by the "
    "ILSVRC-2012 order for a 1,000-class model; else by position when the counts match)"
)
# --class-names, as distill, train_teacher and finetune describe it.
CLASS_NAMES_HELP = (
    "a text file (local or s3://) naming integer labels in order, one a line: WebDataset .cls labels, Parquet or "
    "save_to_disk labels without ClassLabel names (default: a classes.txt beside WebDataset shards, else the numbers)"
)


@dataclass(frozen=True, kw_only=True)
class Shard:
    """One fixed run [start, stop) of a source's inputs in listing order; `id` is its position in the listing.

    Attributes:
        only: read just these keys of the run (sorted), or every input when None.
        keys_only: yield every row's label and key and read no image.
    """

    kind: ClassVar[str] = ""
    id: int
    uri: str
    start: int
    stop: int
    only: tuple[str, ...] | None = None
    keys_only: bool = False

    @property
    def inputs(self) -> int:
        """Inputs this record reads: its `only` keys when narrowed, else its run."""
        return len(self.only) if self.only is not None else self.stop - self.start

    def narrowed(self, keys: Iterable[str]) -> Shard:
        """The same shard reading only `keys`."""
        return dataclasses.replace(self, only=tuple(sorted(keys)))

    def keys_pass(self) -> Shard:
        """The same shard yielding labels and keys only."""
        return dataclasses.replace(self, keys_only=True)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **dataclasses.asdict(self)})


@dataclass(frozen=True)
class ListRequest:
    """What a kind's lister is asked, beside --data: the model's classes and how to cut and label the listing.

    Attributes:
        model_names: the model's class names in id order, or None (a model without id2label).
        num_model_classes: the model's class count, or None with no model yet (training one: the data's
            classes are the model's).
        classes: --classes (names or model ids), or None for every class.
        shard_size: inputs a shard, at most.
        label_names: --class-names, the names of integer labels 0..n-1, or None (the kinds that have them).
        class_map: --class-map (`map_classes`), or None.
        output: the job's --output, where a kind may keep indexes of its files (WebDataset), or None.
    """

    model_names: list[str] | None
    num_model_classes: int | None
    classes: Sequence[str] | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    label_names: list[str] | None = None
    class_map: Mapping[str, int | str] | None = None
    output: str | None = None


@dataclass(frozen=True)
class Listing:
    """What a source holds, from its listing alone (no image decoded but a few probes).

    Attributes:
        kind: the source kind, a key of `sources.SOURCES` ('imagefolder', 'parquet', 'webdataset', ...).
        uri: the --data value.
        names: model class id -> class name, for the classes this run reads.
        counts: model class id -> inputs listed for it (files, rows); classes of `names` only.
        shards: ordered `Shard` records (`id` = position).
        native_size: shorter side of the first readable image (the default output size), or None.
        skipped: inputs refused by the listing itself, as (location, reason).
        listed: for a listing narrowed to a subset (`sources.per_class_subset`), the inputs listed before; else None.
    """

    kind: str
    uri: str
    names: dict[int, str]
    counts: dict[int, int]
    shards: list[Shard]
    native_size: int | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    listed: int | None = None

    @property
    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the kind, the classes and how many inputs each has."""
        return {
            "kind": self.kind,
            "shards": len(self.shards),
            "counts": {self.names[c]: n for c, n in sorted(self.counts.items())},
        }


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1K WordNet ids in class-id order (the sorted wnids), from data/imagenet_wnids.txt."""
    text = resources.files("d3hr_ray.data").joinpath("imagenet_wnids.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def map_classes(
    source_names: Sequence[str],
    model_names: Sequence[str] | None,
    num_model_classes: int | None,
    class_map: Mapping[str, int | str] | None = None,
) -> dict[str, int]:
    """Source class name -> model class id. The classes --class-map names go where it says; the others by the
    first rule that maps them all:

        by name       the model's id2label holds every one of them
        by wnid       they are all ImageNet WordNet ids and the model has 1,000 classes: the ILSVRC-2012 order
                      (the sorted wnids are ids 0..999), whatever subset the source holds
        by position   the source has as many classes as the model (only without --class-map)

    With no model yet (num_model_classes None: training one), the source's classes are the model's.
    Raises ValueError listing, in one line, every class that maps to no model class, or two sent to one.
    """
    if num_model_classes is None:
        return {n: i for i, n in enumerate(source_names)}
    ids = _by_class_map(source_names, model_names, num_model_classes, class_map) if class_map else {}
    rest = [n for n in source_names if n not in ids]
    wnids = imagenet_wnids() if num_model_classes == IMAGENET_CLASSES else []
    if not rest:
        pass
    elif model_names and set(rest) <= set(model_names):
        ids.update({n: list(model_names).index(n) for n in rest})
    elif wnids and set(rest) <= set(wnids):
        ids.update({n: wnids.index(n) for n in rest})
    elif not class_map and len(source_names) == num_model_classes:
        ids.update({n: i for i, n in enumerate(source_names)})
    else:
        if wnids and any(WNID.fullmatch(n) for n in rest):  # meant as wnids: the others are the odd ones out
            unmapped = [n for n in rest if n not in set(wnids)]
        else:
            unmapped = [n for n in rest if n not in set(model_names or ())]
        shown = ", ".join(list(source_names)[:5]) + (", ..." if len(source_names) > 5 else "")
        named = f" named {', '.join(model_names[:5])}{', ...' if len(model_names) > 5 else ''}" if model_names else ""
        raise ValueError(
            f"--data has {len(source_names)} classes ({shown}) but the model has {num_model_classes}{named}; "
            f"{len(unmapped)} map to no class of the model: {', '.join(unmapped)}; use a model trained on these "
            "classes, or map them with --class-map FILE (data class -> model class id or name)"
        )
    taken: dict[int, str] = {}
    for n in source_names:
        if ids[n] in taken:
            raise ValueError(f"--data classes {taken[ids[n]]!r} and {n!r} map to the same model class {ids[n]}")
        taken[ids[n]] = n
    return {n: ids[n] for n in source_names}


def _by_class_map(
    source_names: Sequence[str],
    model_names: Sequence[str] | None,
    num_model_classes: int,
    class_map: Mapping[str, int | str],
) -> dict[str, int]:
    """{source class: model id} for the source classes --class-map names; ValueError naming every target that is
    not a class of the model."""
    by_name = {n: i for i, n in enumerate(model_names or ())}
    ids, bad = {}, []
    for n in source_names:
        if n not in class_map:
            continue
        text = str(class_map[n]).strip()
        cid = int(text) if text.isdigit() else by_name.get(text)
        if cid is None or cid >= num_model_classes:
            bad.append(f"{n} -> {text}")
        else:
            ids[n] = cid
    if bad:
        raise ValueError(
            f"--class-map: {len(bad)} target(s) are not a class of the model (ids 0..{num_model_classes - 1}"
            f"{' or its class names' if by_name else ''}): {', '.join(bad)}"
        )
    return ids


def integer_label_ids(
    counts: Mapping[LabelValue, int],
    names: Sequence[str] | None,
    model_names: Sequence[str] | None,
    num_model_classes: int | None,
    class_map: Mapping[str, int | str] | None = None,
) -> tuple[dict[str, int], dict[str, int], str]:
    """Integer labels (Parquet's `label` column, WebDataset's `.cls`) to the model's classes.

    Args:
        counts: the data's label value (int, or None for a missing one) -> how many inputs have it.
        names: the data's names of labels 0..n-1 (HF ClassLabel metadata, --class-names, classes.txt), or None.
        class_map: --class-map (keys: the names, or the labels as text when unnamed), or None.
    Returns:
        (class name -> model id, the label as text -> model id, the valid labels in words, "0..n-1").
        Named labels map to the model's ids as `map_classes` maps names (a class map, by name, by wnid, by
        position); unnamed labels are the model's ids (named by the model where it has names), or what
        --class-map makes of them.
    """
    present = [int(v) for v in counts if v is not None]
    if names:
        n_src = len(names)
    elif num_model_classes is None or class_map is not None:  # the labels the data holds, not the model's ids
        n_src = max(present, default=-1) + 1
    else:
        n_src = num_model_classes
    src_names = list(names) if names else [str(i) for i in range(n_src)]
    if num_model_classes is None:
        ids = {name: i for i, name in enumerate(src_names)}
    elif names or class_map is not None:
        ids = map_classes(src_names, model_names, num_model_classes, class_map)
    else:
        ids = {(model_names[i] if model_names else str(i)): i for i in range(num_model_classes)}
        src_names = list(ids)
    return ids, {str(i): ids[name] for i, name in enumerate(src_names)}, f"0..{len(src_names) - 1}"


def select_classes(ids: dict[str, int], classes: Sequence[str] | None) -> dict[int, str]:
    """--classes (names or model ids) -> {model id: name}; every class of `ids` (name -> id) when None."""
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


def runs(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] cutting range(n) into consecutive runs of at most `size`."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def probe_native_size(shards: Sequence[Shard], read: Callable[[Any], Iterable[dict]]) -> int | None:
    """The side of the first decodable image among the first PROBE inputs of the first shard, or None.

    Args:
        read: the kind's reader, shard -> rows with an "item" (each reader takes its own kind's record).
    """
    for shard in shards[:1]:
        for row in read(dataclasses.replace(shard, stop=min(shard.stop, shard.start + PROBE))):
            try:
                return image_size(row["item"])
            except ImageError:
                continue
    return None
