"""Training objectives against independent float64 computations."""

import copy

import numpy as np
import torch

from d3hr_ray.stages.diffusion import ModelSpec, alphas_cumprod_from_config
from d3hr_ray.training.objectives import (
    VAETrainStep,
    builtin_label_dropout,
    diffusion_loss,
    disable_builtin_label_drop,
    drop_classes,
    latent_scaling_factor_from,
)
from tests.conftest import rel_err


def test_diffusion_loss_matches_reference(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 4, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 10, 10])  # 10 = null
    t = torch.tensor([0, 5, 250, 600, 999, 42])
    noise = torch.randn(6, 4, 4, 4, generator=g)
    cfg = tiny_pipe.scheduler.config
    betas = np.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
    a = torch.from_numpy(np.cumprod(1 - betas))[t].view(-1, 1, 1, 1)
    m64 = copy.deepcopy(tiny_pipe.transformer).double()
    zt = a.sqrt() * z0.double() + (1 - a).sqrt() * noise.double()
    eps = m64(zt, timestep=t, class_labels=y).sample[:, :4]  # the learned-variance half is not trained
    ref = ((eps - noise.double()) ** 2).mean()
    got = diffusion_loss(tiny_pipe.transformer, z0, y, t, noise, alphas_cumprod_from_config(dict(cfg)), 4)
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()


def test_class_dropout_uses_the_null_class_from_the_config():
    from d3hr_ray.models.build import build_pipeline

    pipe = build_pipeline(num_classes=7)
    null = ModelSpec.from_pipeline(pipe).null_class
    assert null == pipe.transformer.config.num_embeds_ada_norm == 7
    y = torch.arange(7).repeat(2000)  # (14000,)
    assert torch.equal(drop_classes(y, 0.0, null), y)
    assert (drop_classes(y, 1.0, null) == 7).all()
    dropped = drop_classes(y, 0.1, null, torch.Generator().manual_seed(1))
    frac = (dropped == 7).float().mean().item()
    assert abs(frac - 0.1) < 3 * (0.1 * 0.9 / len(y)) ** 0.5 + 1e-9
    assert torch.equal(dropped[dropped != 7], y[dropped != 7])  # the rest keep their labels


def test_vae_step_kl_and_learning(tiny_pipe):
    vae = copy.deepcopy(tiny_pipe.vae).train()
    step = VAETrainStep(vae, kl_weight=0.01)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(8, 4, 4, 4, generator=g)
    loss, rec, kl, z = step(x, noise)
    h = vae.quant_conv(vae.encoder(x)) if vae.quant_conv is not None else vae.encoder(x)
    mean, logvar = h.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    ref_kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    assert rel_err(kl, ref_kl) <= 1e-5 and rel_err(loss, rec + 0.01 * ref_kl) <= 1e-5
    opt = torch.optim.Adam(step.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(30):
        loss = step(x, noise)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_latent_scaling_factor_gives_unit_variance():
    z = [torch.randn(1000, 4) * 3.0 + 1.0, torch.randn(500, 4) * 3.0 + 1.0]
    s = latent_scaling_factor_from(z)
    assert abs(s - 1 / 3.0) < 0.01


def test_builtin_label_drop_is_off_so_training_mode_sees_the_given_labels(tiny_pipe):
    """diffusers' DiT drops labels per block in training mode; switched off, a training-mode forward
    equals the eval-mode forward (no other randomness in the DiT) whatever torch's global seed."""
    m = copy.deepcopy(tiny_pipe.transformer)
    s = m.config.sample_size
    z = torch.randn(32, m.config.in_channels, s, s, generator=torch.Generator().manual_seed(0))  # (B, c, h, w)
    t = torch.full((32,), 500)
    y = torch.arange(32) % m.config.num_embeds_ada_norm  # (B,) real classes only
    with torch.no_grad():
        ref = m.eval()(z, timestep=t, class_labels=y, return_dict=False)[0]
        torch.manual_seed(0)
        before = m.train()(z, timestep=t, class_labels=y, return_dict=False)[0]
    assert not torch.equal(before, ref)  # 32 samples x 2 blocks at p = 0.1: some label was dropped
    assert builtin_label_dropout(m) == 0.1
    assert disable_builtin_label_drop(m) == m.config.num_layers  # one LabelEmbedding per block
    assert builtin_label_dropout(m) == 0.0
    with torch.no_grad():
        for seed in (0, 1):
            torch.manual_seed(seed)
            assert torch.equal(m.train()(z, timestep=t, class_labels=y, return_dict=False)[0], ref)
    # the null row is kept, so the unconditional branch of CFG still has its embedding
    tables = [b.norm1.emb.class_embedder.embedding_table for b in m.transformer_blocks]
    assert all(e.num_embeddings == m.config.num_embeds_ada_norm + 1 for e in tables)
