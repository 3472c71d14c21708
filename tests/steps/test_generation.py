"""steps/generation.py on the tests' Ray: the noise ablation's seeded latents; --from-stats selects the same."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.cifar_slice import job, needs_cifar


@needs_cifar
def test_noise_ablation_starts_from_seeded_standard_normal_latents(first_run, model_dir, tmp_path):
    from d3hr_ray.seeding import generator

    _, out_a = first_run
    manifest, out_n = job(
        tmp_path,
        "n",
        "--from-stats",
        str(out_a / "stats.safetensors"),
        "--latents",
        "noise",
        "--ipc",
        "3",
        "--steps",
        "10",
        "--inversion-step",
        "6",
        "--seed",
        "5",
    )
    got = load_file(out_n / "latents.safetensors")
    shape = got["latents"].shape[1:]
    for pos, c in enumerate(got["labels"].tolist()[::3]):
        want = torch.randn((3, int(np.prod(shape))), generator=generator(5, "noise-latents", c)).view(3, *shape)
        torch.testing.assert_close(got["latents"][3 * pos : 3 * pos + 3], want)
    assert manifest["config"]["latents"] == "noise"


@needs_cifar
def test_from_stats_reproduces_the_selection(first_run, tmp_path):
    _, out_a = first_run
    manifest, out_c = job(
        tmp_path,
        "c",
        "--from-stats",
        str(out_a / "stats.safetensors"),
        "--ipc",
        "3",
        "--candidates",
        "500",
        "--steps",
        "10",
        "--inversion-step",
        "6",
        "--output-size",
        "16",
    )
    a, c = load_file(out_a / "latents.safetensors"), load_file(out_c / "latents.safetensors")
    assert torch.equal(a["latents"], c["latents"]) and torch.equal(a["labels"], c["labels"])
    assert manifest["statistics_from"].endswith("stats.safetensors")
    assert Image.open(out_c / "images" / "cat" / "0.png").size == (16, 16)
