"""Distilled sets through a teacher's eyes: label fidelity, confidence, diversity and coverage, no student trained.

A student run costs minutes to hours; these four numbers cost seconds and say *why* one set teaches
better than another. Every set is read at the teacher's resolution and normalisation, as the
student sees it (without augmentation), and passed through the teacher once:

- fidelity: the teacher's top-1 against the set's own labels (does an image show its class?);
- confidence: the teacher's mean top softmax probability at T = 1;
- diversity: within a class, the mean pairwise Euclidean distance between the teacher's penultimate
  features, L2-normalised (0: identical images; sqrt(2): orthogonal), averaged over classes;
- coverage gap: for each test image, 1 - the largest cosine similarity between its features and
  those of the set's images *of its class*, averaged over the test set (0: every test image has a
  twin in the set). The real test split is only looked at, never trained on.

Sets: distill output folders (or their distilled.parquet), the keys files `evaluate` writes for its baselines
(<output>/sets/seed-<s>.json: the real images a random-real, herding or k-center repeat trained on), and
`--real DATA --real-ipc N` for
random real subsets drawn per class with --real-seeds (numpy's generator on the listing order; a
diagnostic, not the exact subsets `evaluate --baseline random-real` trains on). Classes are matched
by name with the teacher's.

    python -m d3hr_ray.diagnose sets --teacher T --set D3HR=out/d3hr-ipc10 --set noise=out/noise-ipc10 \\
        --real train.parquet --real-ipc 10 --real-seeds 0,1,2 --test test.parquet
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from d3hr_ray.artifacts.distilled import class_names, distilled_parquet
from d3hr_ray.data.preprocess import to_pixels
from d3hr_ray.data.sources import list_source, read_shard
from d3hr_ray.evaluation.teacher import features_and_logits, load_teacher
from d3hr_ray.storage.fs import read_bytes, resolve
from d3hr_ray.training.protocol import normalize

__all__ = ["features_and_logits", "label_and_uri", "rows_of_source", "set_metrics", "stack_pixels", "test_features"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="a train_teacher folder (local or s3://)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LABEL=URI",
        help="a distill output folder or its distilled.parquet, or the keys file of an evaluate baseline "
        "(<output>/sets/seed-<s>.json: random-real, herding, k-center); repeat the flag for several",
    )
    p.add_argument(
        "--real", default=None, help="--data of the real images (ImageFolder, Parquet, s3://) for random real subsets"
    )
    p.add_argument("--real-ipc", type=int, default=10)
    p.add_argument("--real-seeds", default="0", help="comma-separated seeds, one random real subset each")
    p.add_argument("--test", default=None, help="the real test split (any --data form): enables the coverage gap")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (listing order)")


def set_metrics(
    feats: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    test_feats: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """The four numbers of one set.

    Args:
        feats: (N, F) the set's teacher features; logits: (N, K); labels: (N,) int64 class ids.
        test_feats, test_labels: (M, F), (M,) the test split's, for the coverage gap (optional).
    Returns:
        {fidelity, confidence, diversity, coverage_gap (nan without a test split), images}.
    """
    out = {"images": float(len(labels))}
    out["fidelity"] = float((logits.argmax(1) == labels).double().mean())
    out["confidence"] = float(torch.softmax(logits.double(), 1).max(1).values.mean())
    unit = torch.nn.functional.normalize(feats.double(), dim=1)
    per_class = []
    for c in torch.unique(labels).tolist():
        u = unit[labels == c]
        if len(u) > 1:
            d = torch.cdist(u, u)  # (n, n), zero diagonal
            per_class.append(float(d.sum() / (len(u) * (len(u) - 1))))
    out["diversity"] = float(np.mean(per_class)) if per_class else float("nan")
    out["coverage_gap"] = float("nan")
    if test_feats is not None and test_labels is not None and len(test_labels):
        t = torch.nn.functional.normalize(test_feats.double(), dim=1)
        gaps = torch.ones(len(test_labels), dtype=torch.float64)  # a class absent from the set: gap 1
        for c in torch.unique(test_labels).tolist():
            mine = unit[labels == c]
            if len(mine):
                rows = test_labels == c
                gaps[rows] = 1.0 - (t[rows] @ mine.T).max(1).values
        out["coverage_gap"] = float(gaps.mean())
    return out


def _pixels_of_parquet(uri: str, names: list[str], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A distill output -> (N, 3, R, R) uint8 and (N,) teacher class ids (matched by class name)."""
    own = class_names(uri)
    missing = sorted(set(own) - set(names))
    if missing:
        raise SystemExit(f"{uri}: classes {missing} are not among the teacher's")
    fs, path = resolve(distilled_parquet(uri))
    table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
    labels = np.array([names.index(own[int(y)]) for y in table.column("label").to_pylist()], dtype=np.int64)
    return stack_pixels(table.column("image").to_pylist(), resolution), labels


def label_and_uri(spec: str) -> tuple[str, str]:
    """--set LABEL=URI, where LABEL may hold "=" too ("K = 20=out/k20"): the split is at the first "=" whose right
    side looks like a location (s3://, an absolute or relative path, or something that exists), else the first."""
    cuts = [i for i, ch in enumerate(spec) if ch == "="]
    if not cuts or cuts[0] == 0 or cuts[-1] == len(spec) - 1:
        raise SystemExit(f"--set {spec!r}: expected LABEL=URI")
    for i in cuts:
        right = spec[i + 1 :]
        if right.startswith(("s3://", "/", "./", "../", "~")) or os.path.exists(right):
            return spec[:i], right
    return spec[: cuts[0]], spec[cuts[0] + 1 :]


def _pixels_of_keys(uri: str, names: list[str], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A keys file that `evaluate` writes for a baseline (<output>/sets/seed-<s>.json) -> the chosen images of its
    source, (N, 3, R, R) uint8, and their teacher class ids; only the shards holding them are read."""
    chosen = json.loads(read_bytes(uri))
    shard_of = {key: shard for pairs in chosen["keys"].values() for key, shard in pairs}
    listing = list_source(chosen["source"], model_names=names, num_model_classes=len(names))
    wanted: dict[int, list[str]] = {}
    for key, shard in shard_of.items():
        wanted.setdefault(shard, []).append(key)
    items, labels = [], []
    for shard in listing.shards:
        if shard.id in wanted:
            for row in read_shard(shard.narrowed(wanted[shard.id])):
                items.append(row["item"])
                labels.append(row["label"])
    if len(items) != len(shard_of):
        raise SystemExit(f"{uri}: {len(shard_of) - len(items)} of its images are no longer in {chosen['source']}")
    return stack_pixels(items, resolution), np.array(labels, dtype=np.int64)


def rows_of_source(
    uri: str, names: list[str], limit: int | None = None, per_class: int | None = None
) -> tuple[list[Any], np.ndarray]:
    """Any --data source -> (items, labels) of its readable rows in listing order (labels: teacher ids).

    Reading stops after `limit` rows in all, and skips a class's rows after its first `per_class`;
    it stops as soon as every listed class has `per_class` rows.
    """
    listing = list_source(uri, model_names=names, num_model_classes=len(names))
    items, labels = [], []
    kept: dict[int, int] = {}  # class id -> rows kept
    for shard in listing.shards:
        for row in read_shard(shard):
            c = row["label"]
            if row["reason"] or c < 0 or (per_class is not None and kept.get(c, 0) >= per_class):
                continue
            items.append(row["item"])
            labels.append(c)
            kept[c] = kept.get(c, 0) + 1
            full = per_class is not None and len(kept) == len(listing.names) and min(kept.values()) >= per_class
            if full or (limit is not None and len(items) >= limit):
                return items, np.array(labels, dtype=np.int64)
    return items, np.array(labels, dtype=np.int64)


def test_features(
    teacher: torch.nn.Module, meta: dict[str, Any], uri: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test split through the teacher: (M, F) penultimate features, (M, K) logits, (M,) teacher class ids."""
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    items, labels = rows_of_source(uri, names, limit)
    pixels = torch.from_numpy(stack_pixels(items, meta["resolution"]))
    feats, logits = features_and_logits(teacher, normalize(pixels, meta["mean"], meta["std"]))
    return feats, logits, torch.from_numpy(labels)


def stack_pixels(items: list[Any], resolution: int) -> np.ndarray:
    """Source items (image bytes, paths or arrays, as `read_shard` gives them) -> (N, 3, R, R) uint8."""
    return (
        np.stack([to_pixels(it, resolution) for it in items])
        if items
        else np.zeros((0, 3, resolution, resolution), np.uint8)
    )


def run(args: argparse.Namespace) -> int:
    teacher, meta = load_teacher(args.teacher)
    teacher.eval()
    r = meta["resolution"]
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]

    def view(pixels: np.ndarray) -> torch.Tensor:
        return normalize(torch.from_numpy(pixels), meta["mean"], meta["std"])

    test_feats = test_labels = None
    if args.test:
        test_feats, test_logits, test_labels = test_features(teacher, meta, args.test, args.test_limit)
        acc = float((test_logits.argmax(1) == test_labels).double().mean())
        print(f"test split: {len(test_labels)} images, teacher top-1 {acc:.4f}")

    sets: list[tuple[str, np.ndarray, np.ndarray]] = []
    for spec in args.set:
        label, uri = label_and_uri(spec)
        sets.append(
            (label, *(_pixels_of_keys(uri, names, r) if uri.endswith(".json") else _pixels_of_parquet(uri, names, r)))
        )
    if args.real:
        items, labels = rows_of_source(args.real, names)
        for seed in [int(s) for s in args.real_seeds.split(",") if s.strip()]:
            rng = np.random.default_rng(seed)
            pick = np.concatenate(
                [
                    rng.choice(np.flatnonzero(labels == c), min(args.real_ipc, int((labels == c).sum())), replace=False)
                    for c in np.unique(labels)
                ]
            )
            sets.append((f"random real, seed {seed}", stack_pixels([items[i] for i in pick], r), labels[pick]))

    print(f"# distilled sets through the teacher ({meta['arch']}, {r} px, {args.teacher})")
    print("| set | images | fidelity | confidence | diversity | coverage gap |")
    print("|---|---|---|---|---|---|")
    for label, pixels, labels in sets:
        feats, logits = features_and_logits(teacher, view(pixels))
        m = set_metrics(feats, logits, torch.from_numpy(labels), test_feats, test_labels)
        print(
            f"| {label} | {int(m['images'])} | {m['fidelity']:.3f} | {m['confidence']:.3f} | {m['diversity']:.3f} | "
            f"{m['coverage_gap']:.3f} |",
            flush=True,
        )
    return 0
