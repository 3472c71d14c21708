"""D3HR stage 3: per-class Gaussian statistics of the inverted latents, streaming and mergeable.

Each class keeps (count, mean, M2) in float64, updated batch by batch and merged with Chan et al.'s
pairwise formula, so that any partition of the data merged in any order gives the single-pass result
to float tolerance, and memory is O(C * D) however many images a class holds:

    n = na + nb,  delta = mb - ma,  mean = ma + delta * nb / n,  M2 = M2a + M2b + delta^2 * na * nb / n

var = M2 / (n - 1) (unbiased). A class with fewer than 2 samples has no variance: finalising it
raises a ValueError that names the class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["ClassStats", "PartialAccumulator", "batch_partial", "merge_partials"]

_ACC = torch.float64  # accumulator dtype: float32 sums lose digits long before ImageNet's 1,300 per class


class ClassStats:
    """Mergeable per-class mean and variance of D-dimensional vectors.

    Args:
        num_classes: C.
        dim: D (c * h * w of a latent).
        class_names: optional names, used in error messages.

    Attributes (state, all on the CPU):
        n: (C,) int64 sample counts.
        mu: (C, D) float64 running means.
        m2: (C, D) float64 sums of squared deviations from the mean.
    """

    def __init__(self, num_classes: int, dim: int, *, class_names: Sequence[str] | None = None):
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.class_names = list(class_names) if class_names is not None else None
        self.n = torch.zeros(num_classes, dtype=torch.int64)
        self.mu = torch.zeros(num_classes, dim, dtype=_ACC)
        self.m2 = torch.zeros(num_classes, dim, dtype=_ACC)

    # -- accumulation -------------------------------------------------------------------------
    def update(self, latents: torch.Tensor, labels: torch.Tensor) -> ClassStats:
        """Add a batch.

        Args:
            latents: (N, D) any float dtype, any device (e.g. z_K flattened: (N, c*h*w)).
            labels: (N,) int class ids in 0..C-1.
        Returns:
            self, updated in place.
        """
        x = torch.as_tensor(latents).detach().to("cpu", _ACC)
        y = torch.as_tensor(labels).detach().to("cpu", torch.int64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"latents must be (N, {self.dim}), got {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(y.shape)}")
        if x.shape[0] == 0:
            return self
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {y.min().item()}..{y.max().item()}")
        if not torch.isfinite(x).all():
            raise ValueError("latents contain NaN or inf; refusing to fold them into the statistics")
        # The batch's own per-class (count, mean, M2), then one Chan merge into the running state.
        nb = torch.bincount(y, minlength=self.num_classes)  # (C,)
        sums = torch.zeros_like(self.mu).index_add_(0, y, x)  # (C, D)
        mb = sums / nb.clamp(min=1).unsqueeze(1).to(_ACC)  # (C, D)
        m2b = torch.zeros_like(self.m2).index_add_(0, y, (x - mb[y]) ** 2)  # (C, D)
        self._merge_arrays(nb, mb, m2b)
        return self

    def merge(self, other: ClassStats) -> ClassStats:
        """Fold another partial result (same C and D) into this one, in place; returns self."""
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"cannot merge statistics of shape ({other.num_classes}, {other.dim}) into ({self.num_classes}, "
                f"{self.dim})"
            )
        self._merge_arrays(other.n, other.mu, other.m2)
        return self

    def to_partial(self) -> dict[str, torch.Tensor]:
        """The state of the classes seen so far only: a compact partial result to ship between workers.

        Returns:
            {"classes": (k,) int64, "count": (k,) int64, "mean": (k, D) float64, "m2": (k, D) float64}.
        """
        idx = (self.n > 0).nonzero().flatten()
        return {"classes": idx, "count": self.n[idx].clone(), "mean": self.mu[idx].clone(), "m2": self.m2[idx].clone()}

    def merge_partial(self, part: dict[str, torch.Tensor]) -> ClassStats:
        """Fold a `to_partial()` result (from any ClassStats of the same C and D) into this one; returns self."""
        idx = part["classes"].to(torch.int64)
        if part["mean"].shape != (len(idx), self.dim) or (
            len(idx) and (idx.min() < 0 or idx.max() >= self.num_classes)
        ):
            raise ValueError(f"partial statistics do not fit ({self.num_classes}, {self.dim})")
        self._merge_arrays(part["count"].to(torch.int64), part["mean"].to(_ACC), part["m2"].to(_ACC), idx)
        return self

    def _merge_arrays(
        self, nb: torch.Tensor, mb: torch.Tensor, m2b: torch.Tensor, idx: torch.Tensor | None = None
    ) -> None:
        """Chan's update of classes `idx` (all classes if None) with (count, mean, M2) = (nb, mb, m2b)."""
        sel = slice(None) if idx is None else idx
        na, mu_a = self.n[sel], self.mu[sel]
        n = na + nb  # (k,)
        safe = n.clamp(min=1).to(_ACC).unsqueeze(1)  # (k, 1); classes empty on both sides stay zero
        wa, wb = na.to(_ACC).unsqueeze(1), nb.to(_ACC).unsqueeze(1)
        delta = mb - mu_a  # (k, D)
        self.mu[sel] = mu_a + delta * (wb / safe)
        self.m2[sel] = self.m2[sel] + m2b + delta**2 * (wa * wb / safe)
        self.n[sel] = n

    # -- results ------------------------------------------------------------------------------
    def _name(self, c: int) -> str:
        return f"{c} ({self.class_names[c]!r})" if self.class_names else str(c)

    def _require(self, minimum: int, what: str) -> None:
        bad = (self.n < minimum).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(f"class {self._name(c)}: {self.n[c].item()} sample(s)" for c in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ValueError(f"{what} needs at least {minimum} sample(s) per class; {shown}{more}")

    @property
    def count(self) -> torch.Tensor:
        """(C,) int64 samples per class."""
        return self.n.clone()

    @property
    def mean(self) -> torch.Tensor:
        """(C, D) float64 per-class means; raises ValueError naming any empty class."""
        self._require(1, "the class mean")
        return self.mu.clone()

    @property
    def var(self) -> torch.Tensor:
        """(C, D) float64 unbiased per-class variances (M2 / (n - 1)); raises ValueError naming any class with n < 2."""
        self._require(2, "the class variance")
        return self.m2 / (self.n - 1).to(_ACC).unsqueeze(1)

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"count": (C,) int64, "mean": (C, D) float64, "m2": (C, D) float64}: exact, safetensors-ready."""
        return {"count": self.n.clone(), "mean": self.mu.clone(), "m2": self.m2.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], *, class_names: Sequence[str] | None = None) -> ClassStats:
        """Inverse of `state_dict`."""
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"statistics state is missing {sorted(missing)}")
        c, d = state["mean"].shape
        out = cls(c, d, class_names=class_names)
        if state["count"].shape != (c,) or state["m2"].shape != (c, d):
            raise ValueError("statistics state has inconsistent shapes")
        out.n = state["count"].to(torch.int64).clone()
        out.mu = state["mean"].to(_ACC).clone()
        out.m2 = state["m2"].to(_ACC).clone()
        return out

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the exact state to a safetensors file (class names go into its metadata)."""
        meta = dict(metadata or {})
        if self.class_names is not None:
            meta["class_names"] = json.dumps(self.class_names)
        save_file(self.state_dict(), str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ClassStats:
        """Read a file written by `save`."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        names = json.loads(meta["class_names"]) if "class_names" in meta else None
        return cls.from_state_dict(load_file(str(path)), class_names=names)

    def finalise(self, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Float32 (mean, var) of every class for writing, and which of `classes` cannot be distilled.

        Returns:
            mean: (C, D) float32; var: (C, D) float32 unbiased (M2 / (n - 1)), zero where n < 2;
            short: the ids among `classes` with fewer than 2 samples (no variance), sorted.
        """
        var = self.m2 / (self.n - 1).clamp(min=1).to(_ACC).unsqueeze(1)  # (C, D)
        var[self.n < 2] = 0.0
        short = sorted(int(c) for c in classes if self.n[c] < 2)
        return self.mu.to(torch.float32), var.to(torch.float32), short

    def __repr__(self) -> str:
        return f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, total={int(self.n.sum())})"


def batch_partial(latents: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The `to_partial()` of one batch, computed over the classes present only: O(k x D) memory for the k classes
    in the batch, where ClassStats(num_classes, D).update(...).to_partial() allocates (num_classes x D) several
    times (2.9 GB a batch for 21,841 classes at D = 4,096). Bit-identical to that: each class's rows see the same
    additions in the same order.

    Args:
        latents: (N, D) any float dtype, any device.
        labels: (N,) int class ids in 0..num_classes-1.
    Returns:
        {"classes": (k,) int64 sorted, "count": (k,) int64, "mean": (k, D) float64, "m2": (k, D) float64}.
    """
    x = torch.as_tensor(latents).detach()
    y = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    if x.ndim != 2:
        raise ValueError(f"latents must be (N, D), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {y.min().item()}..{y.max().item()}")
    present, local = torch.unique(y, return_inverse=True)  # sorted class ids; each label's row among them
    part = ClassStats(max(1, len(present)), x.shape[1]).update(x, local).to_partial()
    part["classes"] = present[part["classes"]]
    return part


class PartialAccumulator:
    """`to_partial()` results folded left to right, holding only the classes seen so far: O(k x D) memory for k
    classes, whatever C is. Each class's rows take exactly the Chan updates a dense ClassStats would make, in the
    same order, so the result is bit-identical to folding the same parts into a ClassStats.

    Args:
        dim: D.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self._row: dict[int, int] = {}  # class id -> row of `_acc`
        self._acc = ClassStats(8, self.dim)  # capacity doubles as classes arrive

    def __len__(self) -> int:
        """Classes held."""
        return len(self._row)

    @property
    def nbytes(self) -> int:
        """Bytes of the accumulator's tensors (its capacity, which is at most twice the classes held)."""
        return sum(t.numel() * t.element_size() for t in (self._acc.n, self._acc.mu, self._acc.m2))

    def add(self, part: dict[str, torch.Tensor]) -> PartialAccumulator:
        """Fold one `to_partial()` result in; returns self."""
        classes = part["classes"].to(torch.int64).tolist()
        for c in classes:
            if c not in self._row:
                self._row[c] = len(self._row)
        if len(self._row) > self._acc.num_classes:
            self._grow(len(self._row))
        rows = torch.tensor([self._row[c] for c in classes], dtype=torch.int64)
        self._acc.merge_partial({**part, "classes": rows})
        return self

    def _grow(self, needed: int) -> None:
        """Double the capacity until `needed` rows fit; the held rows are copied as they are."""
        k, cap = self._acc.num_classes, self._acc.num_classes
        while cap < needed:
            cap *= 2
        grown = ClassStats(cap, self.dim)
        grown.n[:k], grown.mu[:k], grown.m2[:k] = self._acc.n, self._acc.mu, self._acc.m2
        self._acc = grown

    def to_partial(self) -> dict[str, torch.Tensor]:
        """The classes held, in class id order: {"classes": (k,), "count": (k,), "mean": (k, D), "m2": (k, D)}."""
        ids = sorted(self._row)
        rows = torch.tensor([self._row[c] for c in ids], dtype=torch.int64)
        return {
            "classes": torch.tensor(ids, dtype=torch.int64),
            "count": self._acc.n[rows].clone(),
            "mean": self._acc.mu[rows].clone(),
            "m2": self._acc.m2[rows].clone(),
        }


def merge_partials(parts: Sequence[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    """Merge `to_partial()` results left to right into one, touching only the classes they hold.

    Memory is O(k * D) for the k classes present, not O(C * D): a shard of ImageNet holds one class.
    Returns the same layout: {"classes": (k,), "count": (k,), "mean": (k, D) float64, "m2": (k, D) float64}.
    """
    acc = PartialAccumulator(dim)
    for p in parts:
        acc.add(p)
    return acc.to_partial()
