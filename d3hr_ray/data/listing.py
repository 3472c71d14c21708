"""What every source kind shares: the `Listing` of a data set, the `Shard` record, and the class mapping.

A shard is the unit of resumable work: a fixed run of one source's inputs, readable by any worker from
its record alone. Each kind's record is a frozen dataclass (data/imagefolder.py, parquet.py, digits.py)
that travels as JSON (`to_json`, `sources.shard_from_json`), so Ray tasks carry a few hundred bytes, not
images. Two fields narrow any read: `keys_only` (labels and keys, no image) and `only` (just these keys).
Nothing here imports torch or Ray.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "CLASS_NAMES_HELP",
    "DEFAULT_SHARD_SIZE",
    "PROBE",
    "Listing",
    "Shard",
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
# --class-names, as distill, train_teacher and finetune describe it.
CLASS_NAMES_HELP = (
    "a text file (local or s3://) naming integer labels in order, one a line: WebDataset .cls labels, Parquet "
    "labels without ClassLabel names (default: a classes.txt beside WebDataset shards, else the numbers)"
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

    def narrowed(self, keys) -> Shard:
        """The same shard reading only `keys`."""
        return dataclasses.replace(self, only=tuple(sorted(keys)))

    def keys_pass(self) -> Shard:
        """The same shard yielding labels and keys only."""
        return dataclasses.replace(self, keys_only=True)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **dataclasses.asdict(self)})


@dataclass(frozen=True)
class Listing:
    """What a source holds, from its listing alone (no image decoded but a few probes).

    Attributes:
        kind: 'imagefolder', 'parquet' or 'digits'.
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


def map_classes(
    source_names: Sequence[str], model_names: Sequence[str] | None, num_model_classes: int | None
) -> dict[str, int]:
    """Source class name -> model class id: by name when the model's id2label has them all, else by position.

    With no model yet (num_model_classes None: training one), the source's classes are the model's.
    """
    if num_model_classes is None:
        return {n: i for i, n in enumerate(source_names)}
    if model_names and set(source_names) <= set(model_names):
        return {n: list(model_names).index(n) for n in source_names}
    if len(source_names) == num_model_classes:
        return {n: i for i, n in enumerate(source_names)}
    shown = ", ".join(list(source_names)[:5]) + (", ..." if len(source_names) > 5 else "")
    named = f" named {', '.join(model_names[:5])}{', ...' if len(model_names) > 5 else ''}" if model_names else ""
    raise ValueError(
        f"--data has {len(source_names)} classes ({shown}) but the model has {num_model_classes}{named}; "
        "use a model trained on these classes"
    )


def integer_label_ids(counts: dict, names, model_names, num_model_classes) -> tuple[dict, dict, str]:
    """Integer labels (Parquet's `label` column, WebDataset's `.cls`) to the model's classes.

    Args:
        counts: the data's label value (int, or None for a missing one) -> how many inputs have it.
        names: the data's names of labels 0..n-1 (HF ClassLabel metadata, --class-names, classes.txt), or None.
    Returns:
        (class name -> model id, the label as text -> model id, the valid labels in words, "0..n-1").
        Named labels map to the model's ids by name when the model's id2label holds every name, else by
        position; unnamed labels are the model's ids (named by the model where it has names).
    """
    present = [int(v) for v in counts if v is not None]
    n_src = len(names) if names else (max(present, default=-1) + 1 if num_model_classes is None else num_model_classes)
    src_names = list(names) if names else [str(i) for i in range(n_src)]
    if num_model_classes is None:
        ids = {name: i for i, name in enumerate(src_names)}
    elif names:
        ids = map_classes(src_names, model_names, num_model_classes)
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


def probe_native_size(shards: Sequence[Shard], read) -> int | None:
    """The side of the first decodable image among the first PROBE inputs of the first shard, or None.

    Args:
        read: the kind's reader, shard -> rows with an "item".
    """
    from d3hr_ray.data.preprocess import ImageError, image_size

    for shard in shards[:1]:
        for row in read(dataclasses.replace(shard, stop=min(shard.stop, shard.start + PROBE))):
            try:
                return image_size(row["item"])
            except ImageError:
                continue
    return None
