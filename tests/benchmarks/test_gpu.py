"""benchmarks/gpu.py: its FLOP counts (steps/plan.model_flops) against a closed formula and torch's counter, and
a tiny end-to-end run on the CPU."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu
from benchmarks.__main__ import main
from d3hr_ray.models.build import dit_sizes, vae_config
from d3hr_ray.steps.plan import model_flops


def dit_forward_flops(tcfg: dict) -> int:
    """FLOPs (2 x multiply-adds) of one DiT forward pass for one image, from the transformer config, in closed form
    as diffusers builds DiTTransformer2DModel (T = (latent side / p)^2 tokens, d = heads * head dim, L blocks):

        per block:  4 T d^2 (q, k, v, out) + 8 T d^2 (MLP, 4d) + 2 T^2 d (QK^T, AV)
                    + 6 d^2 (adaLN-Zero modulation) + 256 d + d^2 (the block's own timestep MLP)
        once:       T p^2 c_in d (patch embedding) + 256 d + d^2 (block 0's timestep MLP, run again for
                    the final layer) + 2 d^2 + T d p^2 c_out (final adaLN and projection)
    """
    p = int(tcfg["patch_size"])
    t = (int(tcfg["sample_size"]) // p) ** 2  # tokens
    d = int(tcfg["num_attention_heads"]) * int(tcfg["attention_head_dim"])
    c_in = int(tcfg["in_channels"])
    c_out = int(tcfg.get("out_channels") or c_in)
    block = 12 * t * d * d + 2 * t * t * d + 6 * d * d + 256 * d + d * d
    # The final layer's conditioning comes from block 0's embedder, run a second time.
    once = t * p * p * c_in * d + (256 * d + d * d) + 2 * d * d + t * d * p * p * c_out
    return 2 * (int(tcfg["num_layers"]) * block + once)


def counted_dit_flops(size: str, sample_size: int) -> tuple[int, dict]:
    """FLOPs of one forward of a DiT of this size, counted by FlopCounterMode on the meta device (no compute).

    The math attention backend decomposes SDPA into matrix products, which the counter sees on any device.
    """
    from diffusers import DiTTransformer2DModel

    cfg = dict(dit_sizes()[size], in_channels=4, out_channels=8, sample_size=sample_size, num_embeds_ada_norm=1000)
    with torch.device("meta"):
        model = DiTTransformer2DModel(**cfg).eval()
        z = torch.zeros(1, 4, sample_size, sample_size)
        t = torch.zeros(1, dtype=torch.int64)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(z, timestep=t, class_labels=t)
    return int(counter.get_total_flops()), dict(model.config)


@pytest.mark.parametrize("size,side", [("tiny", 4), ("S/2", 8), ("XL/2", 32)])
def test_dit_flops_formula_matches_counter(size, side):
    """The bench's count (the dry-run plan's) = the closed formula = the counter with attention as matrix products."""
    counted, cfg = counted_dit_flops(size, side)
    assert dit_forward_flops(cfg) == counted
    assert model_flops(cfg, vae_config("tiny"))["dit"] == counted


def test_dit_xl_flops_as_published():
    # D3HR.md: "DiT-XL/2 at 256 is about 119 G multiply-adds (about 237 GFLOP) per forward per image".
    cfg = dict(dit_sizes()["XL/2"], in_channels=4, out_channels=8, sample_size=32)
    assert dit_forward_flops(cfg) / 2e9 == pytest.approx(118.7, abs=0.05)
    assert model_flops(cfg, vae_config("tiny"))["dit"] == dit_forward_flops(cfg)


def test_speedups_and_table():
    rows = [
        {"section": "encode", "config": "a", "items": 8, "seconds": 2.0, "per_s": 4.0, "tflops": 1.0, "mfu": 0.5},
        {"section": "encode", "config": "b", "items": 8, "seconds": 1.0, "per_s": 8.0, "tflops": 2.0, "mfu": 0.6},
        {
            "section": "paper",
            "config": "p",
            "batch": 200,
            "items": 8,
            "seconds": 4.0,
            "per_s": 2.0,
            "tflops": 0.5,
            "mfu": 0.1,
        },
        {
            "section": "generate",
            "config": "one",
            "batch": 1,
            "items": 2,
            "seconds": 2.0,
            "per_s": 1.0,
            "tflops": None,
            "mfu": None,
        },
        {
            "section": "generate",
            "config": "b10",
            "batch": 10,
            "items": 10,
            "seconds": 1.0,
            "per_s": 10.0,
            "tflops": None,
            "mfu": None,
        },
        {
            "section": "paper",
            "config": "p1",
            "batch": 1,
            "items": 2,
            "seconds": 4.0,
            "per_s": 0.5,
            "tflops": None,
            "mfu": None,
        },
    ]
    s = gpu.speedups({"rows": rows})
    assert s["encode_best"]["config"] == "b"
    assert s["encode_vs_paper"] == 4.0 and s["generate_best_vs_one"] == 10.0 and s["generate_best_vs_paper_one"] == 20.0
    text = gpu.table({"rows": rows})
    assert text.count("\n") == len(rows) + 1 and "| encode | b | 8 | 1.00 | 8.00 | 2.0 | 60.0% |" in text


@pytest.mark.slow
def test_bench_gpu_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "gpu",
        "--tiny",
        "--device",
        "cpu",
        "--steps",
        "4",
        "--inversion-step",
        "2",
        "--out",
        str(out),
        "--sections",
        "encode",
        "select",
        "generate",
        "groups",
        "paper",
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    sections = {r["section"] for r in data["rows"]}
    assert sections == {"encode", "select", "generate", "groups", "paper"} and not data["skipped"]
    groups = [r for r in data["rows"] if r["section"] == "groups"]  # 3 classes at IPC 2: one a call, then 2 a call
    assert [(r["ipc"], r["batch"], r["items"]) for r in groups] == [(2, 2, 6), (2, 4, 6)]
    enc = [r for r in data["rows"] if r["section"] == "encode"]
    assert {(r["dtype"], r["batch"]) for r in enc} == {(d, b) for d in ("bfloat16", "float16") for b in (4, 8)}
    for r in enc:  # each row's rate is its items over its seconds, and its MFU that rate over the peak
        assert r["per_s"] == pytest.approx(r["items"] / r["seconds"])
        flops = data["info"]["flops"]
        per_image = flops["vae_encode_counted"] + 2 * 2 * flops["dit_forward_counted"]
        assert r["mfu"] == pytest.approx(per_image * r["per_s"] / data["info"]["peak"]["flops"])
    assert set(data["speedups"]) >= {"encode_best", "encode_vs_paper", "generate_best_vs_one"}
