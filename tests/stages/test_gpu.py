"""The CUDA paths of the stages, against computations written here (skipped without a CUDA device).

Run on a GPU machine with `pytest -m gpu` (jobs/device/run-kit.sh does). Models are the tiny random
pipelines of conftest.py, so the checks are about devices and dtypes, not about model sizes:
- select_group with CUDA generators: deterministic, and its reported score is the score of the group
  it returns (recomputed here from the definition, on the CPU in float64);
- encode, invert and sample in bfloat16 on CUDA against the float64 CPU reference loops of
  test_invert.py and test_generate.py (the DDIM arithmetic stays float32; only the networks run in bf16);
- decode on CUDA in bfloat16 against float32 on the CPU;
- encode's per-image CUDA generators: an image's latent does not depend on its batch.
"""

import copy

import pytest
import torch

from d3hr_ray import decode, encode, invert, sample
from d3hr_ray.seeding import derive_seed, generator
from d3hr_ray.stages.select import group_score, select_group
from tests.conftest import rel_err
from tests.stages.test_generate import ref_sample
from tests.stages.test_invert import ref_invert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3); 30 DDIM steps through a random
# network compound it. Bounds are a few times what a correct bf16 path gives, far below a wrong one (~1).
_BF16_TOL = 5e-2


@pytest.fixture(scope="module")
def cuda_pipes(tiny_pipe):
    """The tiny pipeline on CUDA in float32 and in bfloat16 (copies: the session fixture stays on the CPU)."""
    f32 = copy.deepcopy(tiny_pipe).to("cuda")
    bf16 = copy.deepcopy(tiny_pipe).to("cuda", dtype=torch.bfloat16)
    return f32, bf16


def test_select_group_cuda_generators():
    g = torch.Generator().manual_seed(3)
    d = 256
    mean, std = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    for ipc in (1, 10):
        seed = derive_seed(0, "select", ipc)
        group, score = select_group(mean.cuda(), std.cuda(), ipc=ipc, candidates=3000, seed=seed)
        again, score2 = select_group(mean.cuda(), std.cuda(), ipc=ipc, candidates=3000, seed=seed)
        assert group.device.type == "cuda" and group.shape == (ipc, d) and group.dtype == torch.float32
        assert torch.equal(group, again) and score == score2  # CUDA generators keyed by (seed, block): reproducible
        check = group_score(group.double().cpu(), mean.double(), std.double()).item()
        assert abs(check - score) <= 1e-5 * check
        # The winner of 3000 candidates beats a typical one: the mean of scores of fresh plain draws.
        plain = mean + std * torch.randn(200, ipc, d, generator=g, dtype=torch.float64)
        assert score < group_score(plain, mean.double(), std.double()).mean().item()


def test_cuda_generator_is_a_cuda_stream():
    g = generator(0, "x", device="cuda")
    assert g.device.type == "cuda"
    a = torch.randn(8, generator=g, device="cuda")
    b = torch.randn(8, generator=generator(0, "x", device="cuda"), device="cuda")
    assert torch.equal(a, b)


@torch.no_grad()
def test_bf16_invert_and_sample_match_float64(cuda_pipes, tiny_pipe, ref_models):
    f32, bf16 = cuda_pipes
    model64, _ = ref_models
    g = torch.Generator().manual_seed(7)
    z0, y = torch.randn(6, 4, 4, 4, generator=g), torch.tensor([0, 3, 3, 9, 1, 2])
    ref = ref_invert(model64, tiny_pipe.scheduler.config, z0, y, 50, 30, 4.0)
    for pipe, tol in ((f32, 1e-4), (bf16, _BF16_TOL)):
        out = invert(pipe, z0.cuda(), y.cuda(), steps=50, inversion_step=30, guidance=4.0)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert rel_err(out.cpu(), ref) <= tol
    ref_s = ref_sample(model64, tiny_pipe.scheduler.config, z0, y, 50, 30, 4.0)
    for pipe, tol in ((f32, 1e-4), (bf16, _BF16_TOL)):
        out = sample(pipe, z0.cuda(), y.cuda(), steps=50, start_step=30, guidance=4.0)
        assert out.dtype == torch.float32 and rel_err(out.cpu(), ref_s) <= tol


@torch.no_grad()
def test_bf16_encode_and_decode_match_float64(cuda_pipes, tiny_pipe, ref_models):
    f32, bf16 = cuda_pipes
    _, vae64 = ref_models
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    s = tiny_pipe.vae.config.scaling_factor
    ref = s * vae64.encode(x.double()).latent_dist.mean
    for pipe, tol in ((f32, 1e-5), (bf16, 2e-2)):
        z = encode(pipe, x.cuda(), mode="mean")
        assert z.dtype == torch.float32 and rel_err(z.cpu(), ref) <= tol
    z = torch.randn(5, 4, 4, 4, generator=g)
    ref_img = (vae64.decode(z.double() / s).sample / 2 + 0.5).clamp(0, 1)
    for pipe, tol in ((f32, 1e-5), (bf16, 2e-2)):
        img = decode(pipe, z.cuda())
        assert img.shape == (5, 3, 8, 8) and img.dtype == torch.float32
        assert 0 <= img.min() and img.max() <= 1 and rel_err(img.cpu(), ref_img) <= tol


@torch.no_grad()
def test_encode_cuda_noise_per_image(cuda_pipes):
    f32, _ = cuda_pipes
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(4, 3, 8, 8, generator=g) * 2 - 1).cuda()
    keys = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    whole = encode(f32, x, mode="sample", generator=[generator(0, "encode", k, device="cuda") for k in keys])
    part = encode(f32, x[2:], mode="sample", generator=[generator(0, "encode", k, device="cuda") for k in keys[2:]])
    mean = encode(f32, x, mode="mean")
    # The noise depends on the key alone (kernels for another batch shape may round differently).
    assert rel_err(part, whole[2:]) <= 1e-4
    assert rel_err(whole, mean) > 1e-2  # the posterior noise was really added
