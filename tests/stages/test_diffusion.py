"""stages/diffusion.py: the beta schedules, the constants read from a pipeline's configs, the DDIM grid and the
guided noise, against numpy, diffusers' own scheduler and two separate passes of the float64 transformer."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from d3hr_ray import decode
from d3hr_ray.stages.diffusion import ModelSpec, alphas_cumprod_from_config, ddim_timesteps, guided_eps
from tests.conftest import rel_err


def ref_betas(schedule: str, start: float, end: float, T: int) -> np.ndarray:
    """beta_t, t = 0..T-1, as diffusers' schedulers define them, in numpy float64."""
    if schedule == "linear":
        return np.linspace(start, end, T)
    if schedule == "scaled_linear":
        return np.linspace(np.sqrt(start), np.sqrt(end), T) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal: beta_i = 1 - abar((i+1)/T) / abar(i/T), at most 0.999
        i = np.arange(T)
        abar_lo = np.cos((i / T + 0.008) / 1.008 * np.pi / 2) ** 2
        abar_hi = np.cos(((i + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - abar_hi / abar_lo, 0.999)
    raise AssertionError(schedule)


SCHEDULES = [
    ("linear", 1e-4, 0.02, 1000),
    ("linear", 2e-4, 0.03, 500),
    ("scaled_linear", 8.5e-4, 0.012, 1000),
    ("squaredcos_cap_v2", 1e-4, 0.02, 1000),
    ("squaredcos_cap_v2", 1e-4, 0.02, 40),
]


@pytest.mark.parametrize("schedule,start,end,T", SCHEDULES)
def test_alphas_cumprod_against_numpy(schedule, start, end, T):
    cfg = {"num_train_timesteps": T, "beta_start": start, "beta_end": end, "beta_schedule": schedule}
    a = alphas_cumprod_from_config(cfg)
    assert a.shape == (T,) and a.dtype == torch.float64
    np.testing.assert_allclose(a.numpy(), np.cumprod(1.0 - ref_betas(schedule, start, end, T)), rtol=1e-12)


@pytest.mark.parametrize("schedule,start,end,T", SCHEDULES)
def test_alphas_cumprod_against_diffusers_scheduler(schedule, start, end, T):
    """diffusers' own (float32) alphas_cumprod for the same config: the same schedule, up to its rounding."""
    sched = DDIMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end, beta_schedule=schedule)
    a = alphas_cumprod_from_config(dict(sched.config))
    np.testing.assert_allclose(a.numpy(), sched.alphas_cumprod.double().numpy(), rtol=2e-5, atol=1e-7)


def test_alphas_cumprod_of_trained_betas_and_the_default_schedule():
    betas = [0.1, 0.2, 0.05, 0.5]
    a = alphas_cumprod_from_config({"num_train_timesteps": 4, "trained_betas": betas, "beta_schedule": "nonsense"})
    np.testing.assert_allclose(a.numpy(), [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.95, 0.9 * 0.8 * 0.95 * 0.5], rtol=1e-15)
    no_name = alphas_cumprod_from_config({"num_train_timesteps": 10, "beta_start": 0.1, "beta_end": 0.3})
    np.testing.assert_allclose(no_name.numpy(), np.cumprod(1 - np.linspace(0.1, 0.3, 10)), rtol=1e-15)  # linear


def test_alphas_cumprod_refuses_what_it_cannot_honour():
    cfg = {"num_train_timesteps": 10, "beta_start": 0.1, "beta_end": 0.2}
    with pytest.raises(ValueError, match=r"beta_schedule 'sigmoid' is not supported; expected one of \['linear', "):
        alphas_cumprod_from_config({**cfg, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type 'v_prediction': D3HR needs an epsilon-predicting model"):
        alphas_cumprod_from_config({**cfg, "prediction_type": "v_prediction"})


def test_model_spec_reads_every_constant_from_the_pipelines_configs(tiny_pipe):
    spec = ModelSpec.from_pipeline(tiny_pipe)
    t, v, s = tiny_pipe.transformer.config, tiny_pipe.vae.config, tiny_pipe.scheduler.config
    assert spec.scaling_factor == v.scaling_factor == 0.7 and spec.shift_factor is None
    assert spec.num_classes == t.num_embeds_ada_norm == 10
    assert spec.null_class == 10  # CFG's null label: the row after the last class
    assert spec.latent_shape == (t.in_channels, t.sample_size, t.sample_size) == (4, 4, 4) and spec.latent_dim == 64
    assert spec.learned_sigma is True and t.out_channels == 2 * t.in_channels
    assert (spec.num_train_timesteps, spec.steps_offset) == (s.num_train_timesteps, s.steps_offset) == (1000, 0)
    assert spec.resolution == 8


@torch.no_grad()
def test_model_spec_matches_what_the_networks_do(tiny_pipe):
    """The constants, checked against the weights: image side, output channels, the class table's null row."""
    spec = ModelSpec.from_pipeline(tiny_pipe)
    z = torch.zeros(1, *spec.latent_shape)
    assert decode(tiny_pipe, z).shape[-2:] == (spec.resolution, spec.resolution)
    out = tiny_pipe.transformer(z, timestep=torch.tensor([0]), class_labels=torch.tensor([spec.null_class])).sample
    assert out.shape == (1, 2 * spec.latent_channels if spec.learned_sigma else spec.latent_channels, 4, 4)
    table = tiny_pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == spec.null_class + 1  # classes 0..C-1 and the null row C


def test_model_spec_from_other_configs():
    """Nothing is DiT-XL/2's or the tiny model's: another shape, VAE and schedule give their own constants."""
    tcfg = {"num_embeds_ada_norm": 7, "in_channels": 3, "out_channels": None, "sample_size": 6}
    vcfg = {"latent_channels": 3, "block_out_channels": [8, 8, 16, 16], "scaling_factor": 0.25, "shift_factor": 0.1}
    spec = ModelSpec.from_configs(tcfg, vcfg, {"num_train_timesteps": 300, "steps_offset": 1})
    assert spec == ModelSpec(
        scaling_factor=0.25,
        shift_factor=0.1,
        num_classes=7,
        null_class=7,
        latent_channels=3,
        latent_size=6,
        resolution=6 * 8,  # three halvings in a four-block AutoencoderKL
        learned_sigma=False,  # no out_channels: epsilon only
        num_train_timesteps=300,
        steps_offset=1,
    )
    assert spec.latent_shape == (3, 6, 6) and spec.latent_dim == 108
    assert ModelSpec.from_configs({**tcfg, "out_channels": 3}, vcfg, {"num_train_timesteps": 300}).steps_offset == 0


def test_model_spec_refuses_configs_it_cannot_use():
    tcfg = {"num_embeds_ada_norm": 7, "in_channels": 4, "out_channels": 8, "sample_size": 4}
    vcfg = {"latent_channels": 4, "block_out_channels": [8, 16], "scaling_factor": 0.5}
    scfg = {"num_train_timesteps": 100}
    with pytest.raises(ValueError, match="num_embeds_ada_norm is None: D3HR needs a class-conditional DiT"):
        ModelSpec.from_configs({**tcfg, "num_embeds_ada_norm": None}, vcfg, scfg)
    with pytest.raises(ValueError, match="out_channels=6 must equal in_channels=4"):
        ModelSpec.from_configs({**tcfg, "out_channels": 6}, vcfg, scfg)
    with pytest.raises(ValueError, match="vae latent_channels=3 != transformer in_channels=4"):
        ModelSpec.from_configs(tcfg, {**vcfg, "latent_channels": 3}, scfg)


def _spec(T: int, offset: int = 0) -> ModelSpec:
    tcfg = {"num_embeds_ada_norm": 2, "in_channels": 4, "sample_size": 4}
    vcfg = {"latent_channels": 4, "block_out_channels": [8], "scaling_factor": 1.0}
    return ModelSpec.from_configs(tcfg, vcfg, {"num_train_timesteps": T, "steps_offset": offset})


@pytest.mark.parametrize("T,N,offset", [(1000, 50, 0), (1000, 30, 0), (1000, 1000, 0), (500, 25, 1), (1000, 1, 0)])
def test_ddim_timesteps_leading_spacing(T, N, offset):
    tau = ddim_timesteps(_spec(T, offset), N)
    assert tau == [k * (T // N) + offset for k in range(N)]
    # diffusers' DDIM with "leading" spacing: the same grid, highest first.
    sched = DDIMScheduler(num_train_timesteps=T, steps_offset=offset, timestep_spacing="leading")
    sched.set_timesteps(N)
    assert tau == sched.timesteps.tolist()[::-1]


def test_ddim_timesteps_of_the_paper():
    assert ddim_timesteps(_spec(1000), 50) == list(range(0, 1000, 20))
    assert ddim_timesteps(_spec(1000), 50)[30] == 600  # tau_K for K = 30


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_ddim_timesteps_refuses_a_grid_the_model_has_not(steps):
    want = f"steps must be in 1..1000 \\(the model's num_train_timesteps\\), got {steps}"
    with pytest.raises(ValueError, match=want):
        ddim_timesteps(_spec(1000), steps)


def ref_guided(model64, z, t, y, w):
    """e0 + w (ey - e0), ey and e0 from two separate passes (labels y, then the null class), float64."""
    c, null = model64.config.in_channels, model64.config.num_embeds_ada_norm
    tt = torch.full((len(z),), t)
    ey = model64(z.double(), timestep=tt, class_labels=y).sample[:, :c]  # (B, c, h, w)
    e0 = model64(z.double(), timestep=tt, class_labels=torch.full_like(y, null)).sample[:, :c]  # (B, c, h, w)
    return e0 + w * (ey - e0)


@torch.no_grad()
@pytest.mark.parametrize("t,w", [(600, 4.0), (0, 2.5), (980, 0.0), (300, 1.0)])
def test_guided_eps_against_two_passes(tiny_pipe, ref_models, batch, t, w):
    model64, _ = ref_models
    z, y = batch
    spec = ModelSpec.from_pipeline(tiny_pipe)
    out = guided_eps(tiny_pipe, spec, z, t, y, w)
    assert out.shape == z.shape and out.dtype == torch.float32  # the learned-variance half dropped
    assert rel_err(out, ref_guided(model64, z, t, y, w)) <= 1e-5
    out64 = guided_eps(tiny_pipe, spec, z.double(), t, y, w)
    assert out64.dtype == torch.float64 and rel_err(out64, out) <= 1e-6  # z's dtype; the model runs in its own


@torch.no_grad()
def test_guided_eps_runs_the_null_half_only_when_guided(tiny_pipe, batch):
    z, y = batch
    spec = ModelSpec.from_pipeline(tiny_pipe)
    seen = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    try:
        guided_eps(tiny_pipe, spec, z, 100, y, 1.0)
        guided_eps(tiny_pipe, spec, z, 100, y, 3.0)
    finally:
        hook.remove()
    assert seen == [y.tolist(), y.tolist() + [spec.null_class] * len(y)]  # w = 1: ey alone, one pass of B


def test_guided_eps_refuses_a_model_in_training_mode(tiny_pipe, batch):
    z, y = batch
    pipe = copy.copy(tiny_pipe)  # the session's pipeline stays in eval mode
    pipe.transformer = copy.deepcopy(tiny_pipe.transformer).train()
    with pytest.raises(ValueError, match=r"training mode .* call pipe.transformer.eval\(\) first"):
        guided_eps(pipe, ModelSpec.from_pipeline(tiny_pipe), z, 100, y, 4.0)


def test_schedule_settings_it_does_not_implement_are_refused():
    from d3hr_ray.stages.diffusion import alphas_cumprod_from_config

    base = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        alphas_cumprod_from_config({**base, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="timestep_spacing 'trailing'"):
        alphas_cumprod_from_config({**base, "timestep_spacing": "trailing"})
    assert alphas_cumprod_from_config({**base, "timestep_spacing": "leading"}).shape == (1000,)
