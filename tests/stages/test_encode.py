"""Stage 1 (encode) and decode against float64 computations written here from D3HR.md."""

import pytest
import torch

from d3hr_ray import decode, encode
from tests.conftest import rel_err


def _ref_moments(vae64, x):
    """The VAE posterior (mean, std) by hand: encoder -> quant_conv -> chunk -> clamp(logvar)."""
    h = vae64.encoder(x.double())
    if getattr(vae64, "quant_conv", None) is not None:
        h = vae64.quant_conv(h)
    mean, logvar = h.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


@torch.no_grad()
def test_encode_mean_matches_reference(tiny_pipe, ref_models, images):
    _, vae64 = ref_models
    s = tiny_pipe.vae.config.scaling_factor
    mean, _ = _ref_moments(vae64, images)
    z = encode(tiny_pipe, images, mode="mean")
    assert z.shape == (5, 4, 4, 4) and z.dtype == torch.float32
    assert rel_err(z, s * mean) <= 1e-5


@torch.no_grad()
def test_encode_sample_matches_reference(tiny_pipe, ref_models, images):
    _, vae64 = ref_models
    s = tiny_pipe.vae.config.scaling_factor
    mean, std = _ref_moments(vae64, images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(11)).double()
    z = encode(tiny_pipe, images, mode="sample", generator=torch.Generator().manual_seed(11))
    assert rel_err(z, s * (mean + std * noise)) <= 1e-5
    assert rel_err(z, s * mean) > 1e-3  # the sample really differs from the mean


@torch.no_grad()
def test_per_image_generators_make_latents_batch_independent(tiny_pipe, images):
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(images))]  # noqa: E731
    whole = encode(tiny_pipe, images, generator=gens())
    one_by_one = torch.cat([encode(tiny_pipe, images[i : i + 1], generator=[g]) for i, g in enumerate(gens())])
    assert rel_err(whole, one_by_one) <= 1e-6


@torch.no_grad()
def test_decode_matches_reference(tiny_pipe, ref_models):
    _, vae64 = ref_models
    s = tiny_pipe.vae.config.scaling_factor
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    h = z.double() / s
    if getattr(vae64, "post_quant_conv", None) is not None:
        h = vae64.post_quant_conv(h)
    ref = (vae64.decoder(h) / 2 + 0.5).clamp(0, 1)
    img = decode(tiny_pipe, z)
    assert img.shape == (3, 3, 8, 8) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert rel_err(img, ref) <= 1e-5


def test_encode_rejects_bad_input(tiny_pipe, images):
    with pytest.raises(ValueError, match="mode"):
        encode(tiny_pipe, images, mode="median")
    with pytest.raises(ValueError, match="8x8"):
        encode(tiny_pipe, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="one per image"):
        encode(tiny_pipe, images, generator=[torch.Generator()])
