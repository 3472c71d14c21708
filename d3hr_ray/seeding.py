"""Designed determinism: every random stream is keyed by what it is for, never by who runs it.

`derive_seed(global_seed, "select", class_id)` gives the same 63-bit seed on any worker, in any order,
so a class's latents (or an image's VAE noise, keyed by its path) never depend on the number of
workers or on which one did the work.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(*keys: int | str) -> int:
    """A seed in [0, 2**63) from a tuple of ints and strings (stable across processes and platforms)."""
    for k in keys:
        if not isinstance(k, (int, str)) or isinstance(k, bool):
            raise TypeError(f"seed keys must be int or str, got {type(k).__name__}")
    text = "\x1f".join(f"{type(k).__name__}:{k}" for k in keys)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `derive_seed(*keys)`."""
    import torch  # here, not at the top: derive_seed serves the torch-free data layer (data/subset.py)

    return torch.Generator(device=device).manual_seed(derive_seed(*keys))
