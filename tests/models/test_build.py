"""Random-weight pipelines from configs: shapes read back by ModelSpec, and DiT-XL/2's FLOPs."""

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from d3hr_ray import ModelSpec, build_pipeline


def test_import_loads_no_torch():
    """The job configs read the size names (`dit_sizes`, `VAE_CONFIGS`) without torch or diffusers."""
    code = "import sys, d3hr_ray.models.build; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tiny_pipeline_spec(tiny_pipe):
    spec = ModelSpec.from_pipeline(tiny_pipe)
    assert spec.latent_shape == (4, 4, 4) and spec.resolution == 8 and spec.latent_dim == 64
    assert spec.null_class == spec.num_classes == 10
    assert spec.scaling_factor == tiny_pipe.vae.config.scaling_factor != 0.18215
    assert spec.learned_sigma and not tiny_pipe.transformer.training


def test_dit_xl2_shape_and_flops():
    """Built on the meta device (no memory): the published shape and ~237 GFLOP per 256px forward (D3HR.md)."""
    with torch.device("meta"):
        pipe = build_pipeline(dit="XL/2", vae="sd", resolution=256, num_classes=1000)
    spec = ModelSpec.from_pipeline(pipe)
    assert spec.latent_shape == (4, 32, 32) and spec.latent_dim == 4096 and spec.null_class == 1000
    assert pipe.transformer.config.num_layers == 28
    assert pipe.transformer.inner_dim == 1152
    z = torch.empty(1, 4, 32, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        pipe.transformer(z, timestep=torch.tensor([600], device="meta"), class_labels=torch.tensor([1], device="meta"))
    assert counter.get_total_flops() / 1e9 == pytest.approx(237, rel=0.02)


def test_unknown_names_and_bad_resolution():
    with pytest.raises(ValueError, match="unknown DiT size 'XXL'"):
        build_pipeline(dit="XXL")
    with pytest.raises(ValueError, match="unknown VAE"):
        build_pipeline(vae="huge")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_pipeline(resolution=10)
