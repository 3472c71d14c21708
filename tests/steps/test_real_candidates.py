"""steps/real_candidates.py on the tests' Ray, from a --stats-per-class subset with kept latents."""

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.cifar_slice import CLASSES, job, needs_cifar


@needs_cifar
def test_real_candidates_from_a_seeded_subset_with_kept_latents(ray_local, model_dir, image_root, tmp_path):
    """--stats-per-class draws the purpose-keyed subset; --keep-latents keeps its z_K; --candidates-from real picks
    the group of real latents with the lowest score (all C(n, 2) groups checked here in numpy) and writes those
    very images; --from-stats on the kept latents picks the same."""
    import itertools

    from d3hr_ray.artifacts.state import RunState
    from d3hr_ray.seeding import derive_seed
    from d3hr_ray.storage.fs import OutputDir

    flags = [
        "--model",
        str(model_dir),
        "--encode",
        "mean",
        "--ipc",
        "2",
        "--candidates",
        "300",
        "--steps",
        "10",
        "--inversion-step",
        "6",
        "--candidates-from",
        "real",
    ]
    manifest, out = job(tmp_path, "r", "--data", str(image_root), "--stats-per-class", "5", "--keep-latents", *flags)
    assert manifest["status"] == "complete" and manifest["stats_subset"] == {"per_class": 5, "inputs": 20}
    stats = load_file(out / "stats.safetensors")
    state = RunState(OutputDir(str(out)))
    kept = {}
    for sid in sorted(state.finished_latents()):
        z, labels, keys = state.read_latents(sid)
        kept.update(
            {k: (int(y), z[i].double().numpy()) for i, (k, y) in enumerate(zip(keys, labels.tolist(), strict=True))}
        )
    for c, name in enumerate(CLASSES):
        files = sorted(p.name for p in (image_root / name).iterdir())
        subset = sorted(files, key=lambda f: derive_seed(0, "stats-subset", f"{name}/{f}"))[:5]  # the 5 lowest ranks
        usable = [f"{name}/{f}" for f in subset if f != "broken.jpg"]
        assert manifest["counts"][name]["read"] == 5 and manifest["counts"][name]["used"] == len(usable) == int(
            stats["count"][c]
        )
        assert sorted(k for k, (y, _) in kept.items() if y == c) == sorted(usable)
        z = np.stack([kept[k][1] for k in usable])  # (n, D), float16 as kept
        np.testing.assert_allclose(stats["mean"][c].numpy(), z.mean(0), atol=2e-3 * np.abs(z).max())
        # The lowest score of every group of 2 of the class's kept latents, from the definition (D3HR.md stage 4).
        mu, sd = stats["mean"][c].double().numpy(), np.sqrt(stats["var"][c].double().numpy())
        d = z.shape[1]

        def score(g, d=d, mu=mu, sd=sd):
            m, s = g.mean(0), g.std(0, ddof=1)
            dev = np.divide(g - m, s, out=np.zeros_like(g), where=s > 0)  # a dimension without spread adds nothing
            skew = d / ((d - 1) * (d - 2)) * (dev**3).sum(1)
            return np.linalg.norm(m - mu) + np.linalg.norm(s - sd) + 0.1 * np.linalg.norm(skew)

        best = min(itertools.combinations(range(len(usable)), 2), key=lambda ij: score(z[list(ij)]))
        chosen = manifest["selected_keys"][name]
        assert sorted(chosen) == sorted(usable[i] for i in best)
        assert manifest["scores"][name] == pytest.approx(score(z[list(best)]), rel=1e-3)
        for k, key in enumerate(chosen):  # the distilled images are those inputs, pixel for pixel (32 px: no resize)
            got = np.asarray(Image.open(out / "images" / name / f"{k}.png").convert("RGB"))
            np.testing.assert_array_equal(got, np.asarray(Image.open(image_root / key).convert("RGB")))
    again, _ = job(tmp_path, "r2", "--from-stats", str(out / "stats.safetensors"), *flags)
    assert again["selected_keys"] == manifest["selected_keys"]
