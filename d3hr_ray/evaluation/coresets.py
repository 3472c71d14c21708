"""Coreset baselines: which real images of a class a classical selection rule keeps, from the teacher's features.

    herding   Welling (2009), in the greedy mean-matching form that DC's benchmark and iCaRL use: step k
              adds the image that brings the mean of the chosen features closest to the class mean.
    k-center  greedy k-center (Sener and Savarese, 2018): a seeded first image, then each step adds the
              image farthest from every image chosen so far.

Both work on the teacher's penultimate features, L2-normalised (as iCaRL), in float64, over the images
of one class sorted by key, so a result depends on the features and the seed only, never on the order
in which shards or workers produced them. Pure torch; `evaluate --baseline herding|k-center` streams
the features of the real data set (one class in memory at a time, `ClassSpill`) and reads back only the
chosen images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import torch

from d3hr_ray.seeding import derive_seed

__all__ = ["CORESETS", "ClassSpill", "herding", "k_center", "select_coreset"]


def _unit(feats: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(feats.double(), dim=1)


def herding(feats: torch.Tensor, k: int, seed: int) -> list[int]:
    """Greedy herding: k rows of `feats` (n, F) whose running mean tracks the class mean; `seed` is unused
    (the rule is deterministic; ties go to the lowest row). Returns row indices in the order chosen."""
    u = _unit(feats)  # (n, F)
    mu = u.mean(dim=0)  # (F,)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    free = torch.ones(len(u), dtype=torch.bool)
    for step in range(min(k, len(u))):
        dist = ((mu - (total + u) / (step + 1)) ** 2).sum(dim=1)  # (n,): the mean's distance if row i joined
        dist[~free] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        total += u[i]
        free[i] = False
    return chosen


def k_center(feats: torch.Tensor, k: int, seed: int) -> list[int]:
    """Greedy k-center: a first row drawn with `seed`, then the row farthest (Euclidean) from the chosen
    ones, k rows in all (ties go to the lowest row). Returns row indices in the order chosen."""
    u = _unit(feats)
    n = len(u)
    if n == 0 or k <= 0:
        return []
    first = int(np.random.default_rng(seed).integers(n))
    chosen = [first]
    nearest = torch.cdist(u, u[first : first + 1]).squeeze(1)  # (n,) distance to the nearest chosen row
    for _ in range(min(k, n) - 1):
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, torch.cdist(u, u[i : i + 1]).squeeze(1))
    return chosen


# Registry: baseline name -> rule(features (n, F), k, seed) -> row indices.
CORESETS: dict[str, Callable[[torch.Tensor, int, int], list[int]]] = {"herding": herding, "k-center": k_center}


def select_coreset(rule: str, keys: list[str], feats: np.ndarray, k: int, seed: int, class_id: int) -> list[int]:
    """The rows `rule` keeps of one class, as positions in `keys`: the rows are sorted by key before the rule
    sees them, and the rule's seed is keyed by (seed, rule, class).

    Args:
        keys: the class's N image keys; feats: (N, F) their teacher features, in the same order.
    """
    if rule not in CORESETS:
        raise ValueError(f"unknown coreset rule {rule!r}; choose one of {', '.join(CORESETS)}")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    x = torch.from_numpy(np.ascontiguousarray(feats[order]))
    return [order[i] for i in CORESETS[rule](x, k, derive_seed(seed, rule, class_id))]


class ClassSpill:
    """Rows of a stream grouped by class in a local folder, so that memory holds one class at a time.

    Each class gets `<id>.f32` (its float32 vectors, appended) and `<id>.jsonl` (a JSON value per row, in
    the same order). Files are opened per write, so a thousand classes need no thousand open files.
    """

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.dim: int | None = None
        self.counts: dict[int, int] = {}

    def add(self, labels: np.ndarray, vectors: np.ndarray, values: list) -> None:
        """labels (n,) int, vectors (n, F) float32, values: n JSON-able values (a key, a [key, shard] pair)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.dim is None:
            self.dim = vectors.shape[1]
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of width {vectors.shape[1]} after width {self.dim}")
        labels = np.asarray(labels)
        for c in np.unique(labels).tolist():
            rows = np.flatnonzero(labels == c)
            with open(os.path.join(self.root, f"{c}.f32"), "ab") as f:
                f.write(vectors[rows].tobytes())
            with open(os.path.join(self.root, f"{c}.jsonl"), "a") as f:
                f.writelines(json.dumps(values[i]) + "\n" for i in rows.tolist())
            self.counts[c] = self.counts.get(c, 0) + len(rows)

    def classes(self) -> list[int]:
        return sorted(self.counts)

    def load(self, c: int) -> tuple[list, np.ndarray]:
        """(values, vectors (n_c, F) float32) of class c, in the order they were added."""
        if self.dim is None:
            raise ValueError(f"class {c}: nothing was added to this spill")
        with open(os.path.join(self.root, f"{c}.jsonl")) as f:
            values = [json.loads(line) for line in f]
        vectors = np.fromfile(os.path.join(self.root, f"{c}.f32"), dtype=np.float32).reshape(len(values), self.dim)
        return values, vectors
