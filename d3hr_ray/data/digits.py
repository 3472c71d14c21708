"""scikit-learn's 8x8 digits (they ship inside the wheel): the embedded default data set."""

from __future__ import annotations

import numpy as np

__all__ = ["digits_rgb"]


def digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as images: (N, 8, 8, 3) uint8 RGB (grey levels 0..16 scaled to 0..255), (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return np.repeat(pixels[..., None], 3, axis=-1), d.target.astype(np.int64)
