"""steps/estimate.py on the tests' Ray: the statistics equal the core functions run here, whatever the
batches, actors or input format."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from d3hr_ray import encode, invert
from tests.cifar_slice import CLASSES, PER_CLASS, assert_close, job, needs_cifar, ref_preprocess


def stats_job(tmp_path, name: str, data: str, model_dir, *extra: str):
    """A --stats-only job on `data` with first_run's model, encoder mode and DDIM grid: (manifest, output folder)."""
    grid = ("--steps", "10", "--inversion-step", "6")
    return job(
        tmp_path, name, "--data", data, "--model", str(model_dir), "--encode", "mean", "--stats-only", *grid, *extra
    )


@needs_cifar
def test_statistics_equal_the_core_functions_in_one_process(first_run, model_dir, image_root):
    from diffusers import DiTPipeline

    manifest, out = first_run
    pipe = DiTPipeline.from_pretrained(model_dir)
    stats = load_file(out / "stats.safetensors")
    for c, name in enumerate(CLASSES):
        files = sorted((image_root / name).glob("0*.jpg"))
        x = torch.stack([ref_preprocess(f, 8) for f in files])
        zk = invert(pipe, encode(pipe, x, mode="mean"), torch.full((len(x),), c), steps=10, inversion_step=6)
        z = zk.flatten(1).double().numpy()
        np.testing.assert_allclose(stats["mean"][c].numpy(), z.mean(0), rtol=1e-5, atol=1e-5 * np.abs(z).max())
        # A latent off by dz moves a variance by about 2 * sd * dz: the bound scales with |z| * sd, not var.
        np.testing.assert_allclose(
            stats["var"][c].numpy(), z.var(0, ddof=1), rtol=1e-5, atol=1e-6 * np.abs(z).max() * np.sqrt(z.var(0).max())
        )
        assert stats["count"][c] == PER_CLASS


@needs_cifar
def test_statistics_do_not_depend_on_batches_or_actors(first_run, model_dir, image_root, tmp_path):
    _, out_a = first_run
    _, out_b = stats_job(tmp_path, "b", str(image_root), model_dir, "--batch-size", "7", "--max-actors", "2")
    a, b = load_file(out_a / "stats.safetensors"), load_file(out_b / "stats.safetensors")
    assert torch.equal(a["count"], b["count"])
    assert_close(a["mean"], b["mean"])
    assert_close(a["var"], b["var"])
    assert not (out_b / "latents.safetensors").exists()  # --stats-only stops there


@needs_cifar
def test_parquet_input_gives_the_same_statistics(first_run, model_dir, image_root, tmp_path):
    _, out_a = first_run
    rows = {"image": [], "class": []}
    for c in CLASSES:
        for f in sorted((image_root / c).glob("0*.jpg")):
            rows["image"].append(f.read_bytes())
            rows["class"].append(c)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "pq" / "part-0.parquet")
    _, out_p = stats_job(tmp_path, "p", str(tmp_path / "pq"), model_dir, "--classes", "cat,airplane")
    a, p = load_file(out_a / "stats.safetensors"), load_file(out_p / "stats.safetensors")
    for c in (0, 3):  # airplane, cat
        assert_close(p["mean"][c], a["mean"][c])
        assert_close(p["var"][c], a["var"][c])
    assert p["count"].tolist() == [PER_CLASS, 0, 0, PER_CLASS]


@needs_cifar
def test_a_webdataset_copy_of_the_imagefolder_gives_the_same_statistics(first_run, model_dir, image_root, tmp_path):
    """The CIFAR slice as WebDataset shards written here (two tars, .jpg + .cls, classes.txt beside them, the broken
    JPEG included): every class's statistics and counts are the ImageFolder run's."""
    import io
    import tarfile

    manifest_a, out_a = first_run
    samples = [
        (f"{c}-{f.stem}", f.read_bytes(), i)
        for i, c in enumerate(CLASSES)
        for f in sorted((image_root / c).glob("*.jpg"))
    ]
    root = tmp_path / "wds"
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for t, part in enumerate((samples[: len(samples) // 2], samples[len(samples) // 2 :])):
        with tarfile.open(root / f"train-{t:06d}.tar", "w") as tf:
            for key, jpg, label in part:
                for ext, data in (("jpg", jpg), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    m, out_w = stats_job(tmp_path, "w", str(root / "train-{000000..000001}.tar"), model_dir)
    a, w = load_file(out_a / "stats.safetensors"), load_file(out_w / "stats.safetensors")
    assert w["count"].tolist() == a["count"].tolist() == [PER_CLASS] * 4
    assert_close(w["mean"], a["mean"])
    assert_close(w["var"], a["var"])
    assert m["counts"] == manifest_a["counts"]  # bird: 10 read, 9 used, 1 skipped (the broken JPEG)
