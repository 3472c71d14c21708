"""Plan mode: FLOPs against hand counts, work and bytes against the arithmetic, and a dry run that touches nothing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import main, run
from d3hr_ray.models.build import build_pipeline
from d3hr_ray.steps.plan import (
    PLAN_ACTORS,
    PNG_BYTES_PER_PIXEL,
    SELECT_DRAWS_PER_S,
    CompilePlan,
    format_plan,
    model_flops,
)
from d3hr_ray.workers.resources import compile_choice


def dit_flops_by_hand(cfg: dict) -> int:
    """DiT forward FLOPs (2 per multiply-add) for one latent, written out from the architecture.

    Patch embedding (a p x p conv), L blocks of adaLN-Zero (timestep MLP 256 -> D -> D, then D -> 6D),
    attention (q, k, v, out: 4 T D^2 multiply-adds; scores and values: 2 T^2 D) and an MLP of ratio 4
    (8 T D^2), then the final layer (the conditioning again, D -> 2D, D -> p^2 * out_channels per token).
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, layers = cfg["patch_size"], cfg["num_layers"]
    t = (cfg["sample_size"] // p) ** 2
    cond = 256 * d + d * d
    block = cond + 6 * d * d + 4 * t * d * d + 2 * t * t * d + 8 * t * d * d
    macs = t * d * cfg["in_channels"] * p * p + layers * block + cond + d * 2 * d + t * d * p * p * cfg["out_channels"]
    return 2 * macs


def vae_flops_by_hooks(vae, x: torch.Tensor, decode: bool) -> int:
    """Run the real module on the CPU and add up 2 x MACs of every conv, linear and attention product seen."""
    from diffusers.models.attention_processor import Attention

    total = 0

    def conv(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    def attention(m, inp, out):
        nonlocal total
        b, c, h, w = inp[0].shape
        total += 2 * 2 * b * (h * w) ** 2 * c  # scores (T x T x C) and the weighted values

    hooks = []
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attention))
    with torch.no_grad():
        vae.decode(x) if decode else vae.encode(x)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("dit, vae, res", [("tiny", "tiny", 8), ("S/2", "small", 32)])
def test_model_flops_match_hand_counts(dit, vae, res):
    pipe = build_pipeline(dit=dit, vae=vae, num_classes=10, resolution=res)
    tc, vc = dict(pipe.transformer.config), dict(pipe.vae.config)
    f = model_flops(tc, vc)
    assert f["dit"] == dit_flops_by_hand(tc)
    c, h = tc["in_channels"], tc["sample_size"]
    assert f["encode"] == vae_flops_by_hooks(pipe.vae, torch.zeros(1, 3, res, res), decode=False)
    assert f["decode"] == vae_flops_by_hooks(pipe.vae, torch.zeros(1, c, h, h), decode=True)
    assert f["dit_params"] == sum(p.numel() for p in pipe.transformer.parameters())


def test_dit_xl2_flops_are_twice_the_papers_gflops():
    """The published DiT-XL/2 at 256 px: 118.6 GFLOPs in multiply-adds (Peebles & Xie, Table 4)."""
    from d3hr_ray.models.build import dit_sizes

    cfg = {"in_channels": 4, "out_channels": 8, "sample_size": 32, "num_embeds_ada_norm": 1000, **dit_sizes()["XL/2"]}
    f = dit_flops_by_hand(cfg)
    assert abs(f / 2 / 1e9 - 118.6) < 0.6  # the paper rounds and leaves out the small conditioning MLPs


@pytest.fixture(scope="module")
def plan_setup(tmp_path_factory, tiny_pipe):
    """A saved tiny model (3 classes) and an ImageFolder of 5 + 3 + 2 images, with a text file in one class."""
    root = tmp_path_factory.mktemp("plan")
    pipe = build_pipeline(dit="tiny", vae="tiny", num_classes=3, class_names=["a", "b", "c"])
    pipe.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for name, n in (("a", 5), ("b", 3), ("c", 2)):
        (root / "data" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    (root / "data" / "a" / "labels.txt").write_text("not an image")
    return root, pipe


def test_plan_counts_the_work_and_the_bytes(plan_setup, tmp_path):
    root, pipe = plan_setup
    cfg = DistillConfig(
        data=str(root / "data"),
        model=str(root / "model"),
        output=str(tmp_path / "out"),
        dry_run=True,
        ipc=2,
        candidates=1000,
        steps=10,
        inversion_step=6,
        shard_size=2,
        plan_peak_tflops=100.0,
        plan_mfu=0.5,
        plan_price=3.0,
    )
    plan = run(cfg).plan
    f = model_flops(dict(pipe.transformer.config), dict(pipe.vae.config))
    d = 4 * 4 * 4
    r, w = plan.read, plan.work
    assert r is not None and r.images == 10 and r.per_class == {"a": 5, "b": 3, "c": 2}
    assert r.shards == 3 + 2 + 1  # shards of <= 2 never span two classes
    assert r.refused == [(f"{root / 'data'}/a/labels.txt", "not an image file extension")]
    assert w.invert_dit_passes == 10 * 6 * 2 and w.generate_dit_passes == 3 * 2 * 6 * 2
    assert w.select_draws == 3 * 1000 * 2 * d and w.decode_passes == 6
    flops = 10 * f["encode"] + 120 * f["dit"] + 72 * f["dit"] + 6 * f["decode"]
    hours = flops / (100e12 * 0.5) / 3600 + 3 * 1000 * 2 * d / SELECT_DRAWS_PER_S / 3600
    assert plan.gpu_hours.total == pytest.approx(hours, abs=1e-4)
    assert plan.cost == pytest.approx(round(hours * 3.0, 2))
    out = plan.outputs
    assert out["stats.safetensors"] == 3 * d * 8 + 3 * 8 and out["latents.safetensors"] == 6 * d * 4
    assert out["images/ (PNG, estimated)"] == int(6 * PNG_BYTES_PER_PIXEL * 12 * 12 * 3)  # 12 px: the images' own size
    # --compile auto on the assumed 8 GPU actors: 10 / 8 images each, far below the break-even.
    assert plan.compile["encode+invert"].compile is False
    assert plan.compile["encode+invert"].images_per_actor == pytest.approx(10 / 8)
    assert plan.compile["generate"].images_per_actor == pytest.approx(6 / 8)


def test_the_plan_prints_the_compile_choice_for_an_imagenet_sized_run(plan_setup, tmp_path, capsys):
    """1.28 M images on 8 GPUs (160,000 an actor) compile; 10,000 generated images (1,250 an actor) do not."""
    root, _ = plan_setup
    cfg = DistillConfig(data=str(root / "data"), model=str(root / "model"), output=str(tmp_path / "o"), dry_run=True)
    plan = run(cfg).plan
    choices = {}
    for stage, n in (("encode+invert", 1_281_167), ("generate", 10_000)):
        on, why = compile_choice("auto", "cuda", n / PLAN_ACTORS)
        choices[stage] = CompilePlan(compile=on, reason=why, images_per_actor=n / PLAN_ACTORS)
    text = format_plan(dataclasses.replace(plan, compile=choices), cfg)
    assert "compile   encode+invert: compiled: 160,146 images per actor > break-even 21,000 on cuda" in text
    assert "generate: eager: 1,250 images per actor <= break-even 21,000 on cuda" in text


def test_dry_run_prints_the_plan_and_touches_nothing(plan_setup, tmp_path, capsys, monkeypatch):
    import ray

    started = []
    monkeypatch.setattr(
        ray, "init", lambda *a, **k: started.append(1)
    )  # a Ray of other tests may be up: watch the call
    root, _ = plan_setup
    out = tmp_path / "never"
    code = main(["--data", str(root / "data"), "--model", str(root / "model"), "--output", str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists() and not started
    for what in (
        "10 images in 3 classes",
        "refused by the listing",
        "DiT passes",
        "GPU-hours",
        "stats.safetensors",
        "compile   encode+invert: eager: 1 images per actor <= break-even 21,000 on cuda (GPUs, 8 actors)",
    ):
        assert what in text


def test_plan_flags_are_validated():
    from d3hr_ray.flags import ConfigError

    base = DistillConfig()
    for name, bad in (("plan_mfu", 0.0), ("plan_mfu", 1.5), ("plan_peak_tflops", 0.0), ("plan_price", -1.0)):
        with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
            dataclasses.replace(base, **{name: bad})
    assert json.dumps(dataclasses.asdict(base))  # the config stays JSON-able for the manifest


def test_the_state_plan_follows_the_block_rule_and_the_expected_classes_a_block():
    """Blocks and bytes from the counts, against the formula written out here: shuffled data holds the expected
    distinct classes C (1 - exp(-n / C)) of a block's n images, class-sorted (ImageFolder) about n C / N + 1."""
    import math

    from d3hr_ray.artifacts.blocks import MAX_BLOCKS
    from d3hr_ray.steps.plan import MERGE_S_PER_ELEMENT, READ_S_PER_BYTE, planned_data, state_plan

    d, n, c = 4096, 1_281_167, 1000
    data = planned_data(n, c, 1024, None)
    assert len(data.shards) == 1252 and sum(data.counts.values()) == n and set(data.counts.values()) == {1281, 1282}
    st = state_plan(data, c, d)
    block = math.ceil(1252 / MAX_BLOCKS)
    blocks = math.ceil(1252 / block)
    rows = c * (1 - math.exp(-(n / blocks) / c))
    assert st.block == block and st.blocks == blocks
    assert st.bytes == int(blocks * rows * (16 * d + 16))
    assert st.bytes <= 5e9  # the target for this shape
    assert st.merge_s == pytest.approx(blocks * rows * d * MERGE_S_PER_ELEMENT + st.bytes * READ_S_PER_BYTE)
    sorted_data = dataclasses.replace(data, kind="imagefolder")
    rows_sorted = (n / blocks) * c / n + 1
    assert state_plan(sorted_data, c, d).bytes == int(blocks * rows_sorted * (16 * d + 16))


def test_plan_from_counts_lists_nothing_and_plans_dit_xl2_offline(tmp_path, capsys, monkeypatch):
    """--plan-images/--plan-classes with the hub id: no listing (the --data bucket does not exist), no hub, no
    credentials; the bundled DiT-XL/2 configs, grown to 21,841 classes."""
    import d3hr_ray.data.sources as sources
    import d3hr_ray.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("planning from counts must not list or load anything")

    monkeypatch.setattr(sources, "list_source", refuse)
    monkeypatch.setattr(loading, "load_pipeline", refuse)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    code = main(
        [
            "--model",
            "facebook/DiT-XL-2-256",
            "--data",
            "s3://no-such-bucket/imagenet21k",
            "--plan-images",
            "14197122",
            "--plan-classes",
            "21841",
            "--output",
            str(tmp_path / "never"),
            "--dry-run",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "never").exists()
    assert "14,197,122 images in 21,841 classes, 13,865 shards of <= 1,024" in text
    assert "D = 4,096" in text and "21,841 classes" in text and "DiT pass 237G" in text
    assert "state     statistics in 40 blocks of 347 shards" in text


def test_plan_from_counts_flags_are_validated():
    from d3hr_ray.flags import ConfigError

    base = DistillConfig(dry_run=True)
    with pytest.raises(ConfigError, match="--plan-images and --plan-classes go together"):
        dataclasses.replace(base, plan_images=100)
    with pytest.raises(ConfigError, match="add --dry-run"):
        DistillConfig(plan_images=100, plan_classes=10)
    with pytest.raises(ConfigError, match=r"--plan-images must be an integer >= 2 x --plan-classes"):
        dataclasses.replace(base, plan_images=15, plan_classes=10)
