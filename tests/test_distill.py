"""The distillation job on a local Ray instance, with real CIFAR-10 images and tiny models.

One Ray start for the module. Images are read in place from ../shared/data/cifar10 through symlinks.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from d3hr_ray import build_pipeline, encode, invert
from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import main, run
from d3hr_ray.flags import config_from_args
from tests.conftest import S3_TEST_ENV, start_local_ray

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"
CLASSES = ["airplane", "automobile", "bird", "cat"]
PER_CLASS = 9

needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10 (CI has it beside the clone)")


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One local Ray instance; the S3 endpoint is in the environment first, so every worker sees it."""
    saved = {k: os.environ.get(k) for k in [*S3_TEST_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_TEST_ENV, AWS_ENDPOINT_URL=s3_server)
    ray = start_local_ray()
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 4-class DiT whose id2label names the CIFAR folders (R = 8: CIFAR's 32 px are resized)."""
    folder = tmp_path_factory.mktemp("model") / "dit"
    build_pipeline(num_classes=4, class_names=CLASSES, seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """An ImageFolder of symlinks to real CIFAR-10 JPEGs, plus one corrupt file and one stray file."""
    root = tmp_path_factory.mktemp("data") / "cifar-slice"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / c / f"{i:04d}.jpg").symlink_to(CIFAR / c / f"{i:04d}.jpg")
    (root / "bird" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "README.txt").write_text("stray file at the root")
    return root


def ref_preprocess(path: Path, r: int) -> torch.Tensor:
    """Stage 1 preprocessing by hand: RGB, shorter side to R (bicubic), centre crop, [-1, 1]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = r / min(w, h)
    img = img.resize((max(r, round(w * s)), max(r, round(h * s))), Image.Resampling.BICUBIC)
    left, top = (img.width - r) // 2, (img.height - r) // 2
    img = img.crop((left, top, left + r, top + r))
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding of the model's batched arithmetic: 1e-5 of the values' scale (the job's tolerance)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def job(tmp_path, name, *flags):
    """The job in this process on the module's Ray. One model actor per pool unless the flags say otherwise
    (a later flag wins): the cluster's default here is 4 (4 logical CPUs), and on 2 cores each extra actor's
    start (torch, diffusers, the model: 5-10 s) costs more than it computes on these 36 images. Two actors
    run in test_statistics_do_not_depend_on_batches_or_actors; the default sizing in tests/test_submit.py."""
    cfg = config_from_args(
        DistillConfig, ["--max-actors", "1", "--output", str(tmp_path / name), *flags]
    )  # a later --output wins
    return run(cfg).manifest, tmp_path / name


@pytest.fixture(scope="module")
def first_run(ray_local, model_dir, image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return job(
        out,
        "a",
        "--data",
        str(image_root),
        "--model",
        str(model_dir),
        "--encode",
        "mean",
        "--ipc",
        "3",
        "--candidates",
        "500",
        "--batch-size",
        "4",
        "--max-actors",
        "1",
        "--steps",
        "10",
        "--inversion-step",
        "6",
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
def test_outputs_and_manifest(first_run, image_root):
    import ray
    from torchvision.datasets import ImageFolder

    manifest, out = first_run
    folder = ImageFolder(str(out / "images"))
    assert folder.classes == CLASSES and len(folder) == 4 * 3
    for path, _ in folder.samples:
        assert Image.open(path).size == (32, 32)  # the source images' size by default
    table = pq.read_table(out / "distilled.parquet")
    assert table.num_rows == 12 and table.schema.names == ["image", "label", "class"]
    first = table.column("image")[0].as_py()  # Hugging Face's image struct
    assert first["path"] == "images/airplane/0.png"
    Image.open(io.BytesIO(first["bytes"])).load()
    assert ray.data.read_parquet(str(out / "distilled.parquet")).count() == 12
    lat = load_file(out / "latents.safetensors")
    assert lat["latents"].shape == (12, 4, 4, 4) and lat["labels"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    Image.open(out / "grid.png").load()
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_names"] == CLASSES
    assert m["counts"]["bird"] == {"read": PER_CLASS + 1, "used": PER_CLASS, "skipped": 1}
    reasons = {Path(s["input"]).name: s["reason"] for s in m["skipped"]}
    assert reasons["broken.jpg"].startswith(("corrupt image", "not an image"))
    assert reasons["README.txt"] == "not inside a class folder"
    assert set(m["versions"]) == {"d3hr_ray", "torch", "diffusers", "ray"}
    assert m["stages"]["encode+invert+stats"]["items"] == 4 * PER_CLASS


@needs_cifar
def test_distilled_set_loads_without_glue(first_run):
    """Ray Data (read_distilled, for a downstream Ray Train job) and Hugging Face datasets read distilled.parquet."""
    import datasets

    from d3hr_ray.pipeline.distilled import read_distilled

    _, out = first_run
    ds, names = read_distilled(str(out))
    assert names == CLASSES
    rows = sorted(ds.take_all(), key=lambda r: (int(r["label"]), r["image"].tobytes()))
    expected = sorted(
        (
            (c, np.asarray(Image.open(p).convert("RGB")))
            for c, name in enumerate(CLASSES)
            for p in (out / "images" / name).glob("*.png")
        ),
        key=lambda x: (x[0], x[1].tobytes()),
    )
    assert len(rows) == len(expected) == 12
    for row, (label, pixels) in zip(rows, expected, strict=True):
        assert int(row["label"]) == label and row["image"].dtype == np.uint8 and np.array_equal(row["image"], pixels)

    hf = datasets.load_dataset("parquet", data_files=str(out / "distilled.parquet"), split="train")
    assert hf.features["label"].names == CLASSES and isinstance(hf.features["image"], datasets.Image)
    first = hf[0]
    assert first["image"].size == (32, 32) and hf.features["label"].int2str(first["label"]) == first["class"]


@needs_cifar
def test_statistics_do_not_depend_on_batches_or_actors(first_run, model_dir, image_root, tmp_path):
    _, out_a = first_run
    _, out_b = job(
        tmp_path,
        "b",
        "--data",
        str(image_root),
        "--model",
        str(model_dir),
        "--encode",
        "mean",
        "--stats-only",
        "--batch-size",
        "7",
        "--max-actors",
        "2",
        "--steps",
        "10",
        "--inversion-step",
        "6",
    )
    a, b = load_file(out_a / "stats.safetensors"), load_file(out_b / "stats.safetensors")
    assert torch.equal(a["count"], b["count"])
    assert_close(a["mean"], b["mean"])
    assert_close(a["var"], b["var"])
    assert not (out_b / "latents.safetensors").exists()  # --stats-only stops there


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


@needs_cifar
def test_real_candidates_from_a_seeded_subset_with_kept_latents(ray_local, model_dir, image_root, tmp_path):
    """--stats-per-class draws the purpose-keyed subset; --keep-latents keeps its z_K; --candidates-from real picks
    the group of real latents with the lowest score (all C(n, 2) groups checked here in numpy) and writes those
    very images; --from-stats on the kept latents picks the same."""
    import itertools

    from d3hr_ray.io.fs import OutputDir
    from d3hr_ray.pipeline.state import RunState
    from d3hr_ray.seeding import derive_seed

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
def test_parquet_input_gives_the_same_statistics(first_run, model_dir, image_root, tmp_path):
    _, out_a = first_run
    rows = {"image": [], "class": []}
    for c in CLASSES:
        for f in sorted((image_root / c).glob("0*.jpg")):
            rows["image"].append(f.read_bytes())
            rows["class"].append(c)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "pq" / "part-0.parquet")
    _, out_p = job(
        tmp_path,
        "p",
        "--data",
        str(tmp_path / "pq"),
        "--model",
        str(model_dir),
        "--encode",
        "mean",
        "--stats-only",
        "--steps",
        "10",
        "--inversion-step",
        "6",
        "--classes",
        "cat,airplane",
    )
    a, p = load_file(out_a / "stats.safetensors"), load_file(out_p / "stats.safetensors")
    for c in (0, 3):  # airplane, cat
        assert_close(p["mean"][c], a["mean"][c])
        assert_close(p["var"][c], a["var"][c])
    assert p["count"].tolist() == [PER_CLASS, 0, 0, PER_CLASS]


@needs_cifar
def test_strict_stops_on_the_first_bad_input(ray_local, model_dir, image_root, tmp_path, capsys):
    code = main(
        [
            "--data",
            str(image_root),
            "--model",
            str(model_dir),
            "--output",
            str(tmp_path / "s"),
            "--strict",
            "--steps",
            "10",
            "--inversion-step",
            "6",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "--strict" in err and ("README.txt" in err or "broken.jpg" in err)


@needs_cifar
def test_s3_in_and_out(first_run, ray_local, model_dir, image_root, s3_server, tmp_path):
    """ImageFolder read from s3:// and every output written to s3:// (moto's server)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="data")
    s3.create_bucket(Bucket="out")
    for f in image_root.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket="data", Key=f"cifar-slice/{f.relative_to(image_root).as_posix()}", Body=f.read_bytes())
    manifest, _ = job(
        tmp_path,
        "unused",
        "--data",
        "s3://data/cifar-slice",
        "--model",
        str(model_dir),
        "--encode",
        "mean",
        "--output",
        "s3://out/run1",
        "--ipc",
        "2",
        "--candidates",
        "100",
        "--steps",
        "10",
        "--inversion-step",
        "6",
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="out", Prefix="run1/")["Contents"]}
    for name in ("stats.safetensors", "latents.safetensors", "distilled.parquet", "grid.png", "manifest.json"):
        assert f"run1/{name}" in keys
    assert sum(k.startswith("run1/images/") for k in keys) == 4 * 2
    assert not any(".tmp" in k or "/.d3hr-" in k for k in keys)
    from safetensors.torch import load

    remote = load(s3.get_object(Bucket="out", Key="run1/stats.safetensors")["Body"].read())
    local = load_file(first_run[1] / "stats.safetensors")
    assert_close(remote["mean"], local["mean"])
    assert manifest["counts"]["bird"]["skipped"] == 1
