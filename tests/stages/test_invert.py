"""Stage 2 (DDIM inversion) against a float64 loop written here from D3HR.md, and its argument checks."""

import numpy as np
import pytest
import torch

from d3hr_ray import invert
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.invert import check_labels, check_steps
from tests.conftest import rel_err
from tests.stages.conftest import ref_alphas, ref_eps


def ref_invert(model64, cfg, z0, y, steps, K, w):
    a = ref_alphas(cfg)
    tau = [k * (cfg["num_train_timesteps"] // steps) for k in range(steps)]
    z = z0.double()
    for k in range(1, K + 1):
        t, tp = tau[k], tau[k - 1]
        e = ref_eps(model64, z, t, y, w)
        z = np.sqrt(a[t]) * (z - np.sqrt(1 - a[tp]) * e) / np.sqrt(a[tp]) + np.sqrt(1 - a[t]) * e
    return z


@torch.no_grad()
@pytest.mark.parametrize("steps,K,w", [(50, 30, 4.0), (50, 3, 1.0), (20, 19, 2.5)])
def test_invert_matches_reference(tiny_pipe, ref_models, batch, steps, K, w):
    model64, _ = ref_models
    z0, y = batch
    ref = ref_invert(model64, tiny_pipe.scheduler.config, z0, y, steps, K, w)
    out = invert(tiny_pipe, z0, y, steps=steps, inversion_step=K, guidance=w)
    assert out.shape == z0.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, z0) > 1e-2  # the latents really moved


@torch.no_grad()
def test_invert_reads_the_schedule_from_the_config(other_schedule_pipe, ref_models, batch):
    model64, _ = ref_models
    z0, y = batch
    ref = ref_invert(model64, other_schedule_pipe.scheduler.config, z0, y, 25, 15, 4.0)
    assert rel_err(invert(other_schedule_pipe, z0, y, steps=25, inversion_step=15), ref) <= 1e-5


@torch.no_grad()
def test_invert_keeps_float64(tiny_pipe, ref_models, batch):
    """float64 latents stay float64 (the DDIM arithmetic in float64; the network runs in its own dtype)."""
    model64, _ = ref_models
    z0, y = batch
    out = invert(tiny_pipe, z0.double(), y, steps=10, inversion_step=4)
    assert out.dtype == torch.float64
    assert rel_err(out, ref_invert(model64, tiny_pipe.scheduler.config, z0, y, 10, 4, 4.0)) <= 1e-5


def test_invalid_arguments_are_named(tiny_pipe, batch):
    z, y = batch
    with pytest.raises(ValueError, match="inversion_step"):
        invert(tiny_pipe, z, y, steps=50, inversion_step=50)
    with pytest.raises(ValueError, match="class ids in 0..9"):
        invert(tiny_pipe, z, torch.tensor([0, 1, 2, 10]), steps=10, inversion_step=2)
    with pytest.raises(ValueError, match="labels must be"):
        invert(tiny_pipe, z, torch.tensor([0, 1]), steps=10, inversion_step=2)


@pytest.mark.parametrize("steps,step", [(50, 1), (50, 49), (2, 1)])
def test_check_steps_accepts_k_on_the_grid(steps, step):
    check_steps(steps, step, "inversion_step")


@pytest.mark.parametrize("steps,step", [(50, 0), (50, 50), (50, -1), (1, 1)])
def test_check_steps_refuses_k_off_the_grid(steps, step):
    want = f"^inversion_step must be in 1..{steps - 1} for steps={steps}, got {step}$"
    with pytest.raises(ValueError, match=want):
        check_steps(steps, step, "inversion_step")


def test_check_labels(tiny_pipe):
    spec = ModelSpec.from_pipeline(tiny_pipe)
    z = torch.zeros(3, *spec.latent_shape)
    out = check_labels(spec, z, [9, 0, 4])
    assert out.dtype == torch.int64 and out.tolist() == [9, 0, 4]
    assert check_labels(spec, torch.zeros(0, *spec.latent_shape), torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, 4, 4\), got \(3, 4, 8, 8\)"):
        check_labels(spec, torch.zeros(3, 4, 8, 8), [0, 1, 2])
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, 4, 4\), got \(4, 4, 4\)"):
        check_labels(spec, torch.zeros(4, 4, 4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels must be \(3,\) to match the latents, got \(3, 1\)"):
        check_labels(spec, z, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="class ids in 0..9"):
        check_labels(spec, z, [0, -1, 2])
