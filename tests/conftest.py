"""Shared fixtures: tiny random-weight DiT pipelines and their float64 twins for reference maths."""

import copy

import pytest
import torch

from d3hr_ray.models.build import build_pipeline


@pytest.fixture(scope="session")
def tiny_pipe():
    """A float32 DiT pipeline: 10 classes, R = 8, latents (4, 4, 4), learned sigma, scaling 0.7."""
    return build_pipeline(dit="tiny", vae="tiny", num_classes=10, seed=0)


@pytest.fixture(scope="session")
def ref_models(tiny_pipe):
    """float64 copies of the transformer and VAE, for the tests' independent computations."""
    return copy.deepcopy(tiny_pipe.transformer).double(), copy.deepcopy(tiny_pipe.vae).double()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """|x - ref| / |ref| in float64 (Frobenius norms)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()
