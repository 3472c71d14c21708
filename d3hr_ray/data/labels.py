"""Integer labels, as Parquet, WebDataset and saved Hugging Face datasets store them: counted by the listing,
mapped to the model's classes, and resolved row by row by the shard reader.

    listing:  the label values and their counts -> `count_integer_labels` (or `count_labels` for labels that are
              names) -> `LabelCounts` (the classes this run reads, inputs a class, what every shard carries)
    reader:   `LabelledShard.label_of(value)` -> (model class id, "") | (-1, reason) | None (a class left out)

A row whose label is missing or outside the data's classes keeps its place with a reason (counted and
reported, never dropped); a row of a class --classes leaves out is left out by request, not lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypedDict

from d3hr_ray.data.listing import LabelValue, ListRequest, Shard, integer_label_ids, select_classes

__all__ = ["LabelCounts", "LabelledShard", "ShardLabels", "count_integer_labels", "count_labels"]


@dataclass(frozen=True, kw_only=True)
class LabelledShard(Shard):
    """A shard whose rows carry the data's own label values (Parquet, WebDataset, saved HF datasets).

    Attributes:
        labels: the label as text -> the model's class id, for every class of the data.
        valid: what a label must be, for the reason given to one that is not ("0..9").
        keep: the model class ids this run reads (--classes); rows of the others are left out.
    """

    labels: dict[str, int]
    valid: str
    keep: tuple[int, ...]

    @cached_property
    def _kept(self) -> frozenset[int]:
        return frozenset(self.keep)  # a row's class looked up in a set: ImageNet has 1,000

    def label_of(self, value: object, *, name: str = "label", missing: str = "null") -> tuple[int, str] | None:
        """One row's (model class id, ""), or (-1, reason) for a missing `value` ("no <name> (<missing>)") or one
        outside the data's classes; None for a row of a class this run does not distil (--classes)."""
        if value is None:
            return -1, f"no {name} ({missing})"
        cid = self.labels.get(str(value))
        if cid is None:
            return -1, f"{name} {value} is outside {self.valid}"
        if cid not in self._kept:
            return None
        return cid, ""


class ShardLabels(TypedDict):
    """The fields of `LabelledShard` that every shard of one listing shares: `KindShard(..., **shard_labels)`."""

    labels: dict[str, int]
    valid: str
    keep: tuple[int, ...]


@dataclass(frozen=True)
class LabelCounts:
    """A listing's labels, counted and mapped to the model's classes.

    Attributes:
        names: model class id -> class name, for the classes this run reads (the `Listing`'s names).
        counts: model class id -> inputs with that class's label, for the classes of `names`.
        shard: what each `LabelledShard` of the listing carries.
    """

    names: dict[int, str]
    counts: dict[int, int]
    shard: ShardLabels


def count_labels(
    values: Mapping[LabelValue, int],
    ids: dict[str, int],
    labels: dict[str, int],
    valid: str,
    classes: Sequence[str] | None,
) -> LabelCounts:
    """The listing's `LabelCounts` from its label values and their mapping.

    Args:
        values: each label value found (None for a missing one) -> how many inputs have it.
        ids, labels, valid: class name -> model id, the label as text -> model id, the valid labels in words
            (`listing.integer_label_ids`, or `listing.map_classes` for labels that are names).
        classes: --classes (names or model ids), or None for every class.
    """
    names = select_classes(ids, classes)
    per_id: dict[int, int] = {}
    for v, k in values.items():
        if v is not None and str(v) in labels:
            per_id[labels[str(v)]] = per_id.get(labels[str(v)], 0) + k
    counts = {c: per_id.get(c, 0) for c in names}
    return LabelCounts(names, counts, ShardLabels(labels=labels, valid=valid, keep=tuple(sorted(names))))


def count_integer_labels(
    values: Mapping[LabelValue, int], names: Sequence[str] | None, ask: ListRequest
) -> LabelCounts:
    """`count_labels` for integer labels 0..n-1, named by `names` (ClassLabel metadata, --class-names, classes.txt)
    or unnamed, and mapped to the model's classes by `listing.integer_label_ids`."""
    ids, labels, valid = integer_label_ids(values, names, ask.model_names, ask.num_model_classes, ask.class_map)
    return count_labels(values, ids, labels, valid, ask.classes)
