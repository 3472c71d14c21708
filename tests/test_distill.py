"""The distillation job (distill.py) on the tests' Ray, with real CIFAR-10 images and tiny models: outputs and
manifest, --strict, and s3:// in and out. The steps' own checks are in tests/steps/, tests/workers/ and
tests/artifacts/. Images are read in place from ../shared/data/cifar10 through symlinks."""

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import load_file

from d3hr_ray.distill import main
from tests.artifacts.test_report_html import check_report
from tests.cifar_slice import CLASSES, PER_CLASS, assert_close, job, needs_cifar
from tests.conftest import S3_TEST_ENV


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
    page = check_report(out, {c: 3 for c in CLASSES})  # report.html: a row per class, its 3 images
    assert [r["cells"][1] for r in page.rows] == [str(m["counts"][c]["used"]) for c in CLASSES]


@needs_cifar
def test_the_run_is_logged_to_mlflow(first_run):
    from mlflow.tracking import MlflowClient

    manifest, out = first_run
    client = MlflowClient(tracking_uri=f"file://{out.parent / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("d3hr_ray.distill").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert run.data.params["ipc"] == "3" and run.data.params["candidates"] == "500"
    got = run.data.metrics
    stage = manifest["stages"]["encode+invert+stats"]  # logged as encode_invert_stats (MLflow refuses "+")
    assert got["encode_invert_stats/seconds"] == pytest.approx(stage["seconds"])
    assert (got["images_read"], got["images_used"], got["images_skipped"]) == (4 * PER_CLASS + 1, 4 * PER_CLASS, 1)
    assert got["classes_undistilled"] == 0
    assert got["select_actor_s/seconds"] == pytest.approx(manifest["stages"]["select (actor s)"]["seconds"])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["grid.png", "manifest.json"]
    assert json.loads(open(client.download_artifacts(run.info.run_id, "manifest.json")).read()) == manifest


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
def test_s3_in_and_out(first_run, ray_local, model_dir, image_root, s3_server, tmp_path, monkeypatch):
    """ImageFolder read from s3:// and every output written to s3:// (moto's server)."""
    import boto3

    for k, v in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}.items():  # the driver's side (the workers have them)
        monkeypatch.setenv(k, v)
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
    assert "run1/report.html" in keys
    assert sum(k.startswith("run1/images/") for k in keys) == 4 * 2
    copy = tmp_path / "copy"  # the bucket's keys as a static website serves them: report.html's links resolve
    for key in keys:
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes(s3.get_object(Bucket="out", Key=key)["Body"].read())
    check_report(copy / "run1", {c: 2 for c in CLASSES})
    assert not any(".tmp" in k or "/.d3hr-" in k for k in keys)
    from safetensors.torch import load

    remote = load(s3.get_object(Bucket="out", Key="run1/stats.safetensors")["Body"].read())
    local = load_file(first_run[1] / "stats.safetensors")
    assert_close(remote["mean"], local["mean"])
    assert manifest["counts"]["bird"]["skipped"] == 1


def test_wnid_folders_and_a_class_map_reach_a_1000_class_imagenet_dit(tmp_path, capsys):
    """A tiny DiT shaped like DiT-XL/2's classes (1,000, ImageNet's English id2label) and ImageNet-style folders
    named by WordNet ids: the folders reach the model by the ILSVRC-2012 order, an odd folder by --class-map,
    and without the map the odd folder is named in the one error line. Nothing runs past the listing."""
    from torchvision.datasets.imagenette import Imagenette
    from torchvision.models import ResNet18_Weights

    from d3hr_ray.artifacts.state import run_keys
    from d3hr_ray.config import DistillConfig
    from d3hr_ray.models.build import build_pipeline
    from d3hr_ray.steps.inputs import open_job
    from tests.data.conftest import png

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet's names in class-id order
    model = tmp_path / "dit-in1k"
    build_pipeline(num_classes=1000, class_names=categories, seed=1).save_pretrained(model)
    root = tmp_path / "imagenette-3"
    wnids = ["n03888257", "n01440764", "n03417042"]  # parachute, tench, garbage truck
    for name in [*wnids, "my cats"]:
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(png(40 * i + 10))
    (tmp_path / "map.csv").write_text("# data class,model class\nmy cats,tabby\nn01440764,0\n")
    cfg = DistillConfig(data=str(root), model=str(model), class_map=str(tmp_path / "map.csv"))
    job = open_job(cfg)
    # A resumed run must find the same mapping, not just the same file name: the key holds its content.
    assert run_keys(cfg, "float32", 8, 1)[0]["class_map"] == {"my cats": "tabby", "n01440764": "0"}
    # The map sends "my cats" to the model's "tabby" (281) and restates tench's id; the others go by wnid.
    folders = {"n01440764": 0, "n03417042": 569, "n03888257": 701, "my cats": 281}
    assert job.names == {i: n for n, i in sorted(folders.items(), key=lambda x: x[1])}
    assert {s.folder.rsplit("/", 1)[-1]: s.label for s in job.listing.shards} == folders
    assert [categories[i] for i in (0, 281, 569, 701)] == ["tench", "tabby", "garbage truck", "parachute"]

    (root / "my cats").rename(tmp_path / "cats-aside")
    job = open_job(DistillConfig(data=str(root), model=str(model)))
    expected = {w: names[0] for w, names in Imagenette._WNID_TO_CLASS.items() if w in wnids}
    assert {n: categories[c] for c, n in job.names.items()} == expected
    (tmp_path / "cats-aside").rename(root / "my cats")
    assert main(["--data", str(root), "--model", str(model), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 map to no class of the model: my cats;" in err[0] and "--class-map" in err[0]


def test_overwrite_clears_a_runs_files_and_keeps_the_listings_index_and_other_files(tmp_path):
    from d3hr_ray.distill import clear_outputs
    from d3hr_ray.storage.fs import OutputDir

    for rel in (
        "_state/run.json",
        "_state/blocks/000000.safetensors",
        "_state/shards/000003.safetensors",
        "_state/classes/000001.safetensors",
        "_state/latents/000000.safetensors",
        "_state/index/abc.json",
        "images/a/0.png",
        "manifest.json",
        "notes.txt",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    clear_outputs(OutputDir(str(tmp_path)))
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["_state/index/abc.json", "notes.txt"]
