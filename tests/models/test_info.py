"""model_info: a model's ModelSpec and class names from its config files, without diffusers; the driver stays light."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d3hr_ray import ModelSourceError, ModelSpec, load_pipeline
from d3hr_ray.models.info import BUNDLED_SHAPES, bundled_model_info, model_info
from tests.models.conftest import upload

REPO = Path(__file__).resolve().parents[2]


def loaded(source) -> tuple[ModelSpec, list[str] | None]:
    """The spec and id2label names of the pipeline diffusers loads: the reference model_info must equal."""
    pipe = load_pipeline(source)
    names = [n for n, _ in sorted(pipe.labels.items(), key=lambda kv: kv[1])] if pipe.labels else None
    return ModelSpec.from_pipeline(pipe), names


def test_builtin_folder_and_s3_equal_the_loaded_pipeline(saved, s3_env):
    _, folder = saved
    s3_env.create_bucket(Bucket="models")
    upload(s3_env, folder, "models", "info/tiny")
    for source in ("builtin:digits", folder, str(folder), "s3://models/info/tiny"):
        info = model_info(source)
        assert (info.spec, info.class_names) == loaded(source), source
        cfg = load_pipeline(source).transformer.config
        assert info.configs is not None and info.configs["transformer"]["sample_size"] == cfg.sample_size
    assert model_info(folder).class_names == ["ant", "bee", "cow"]


def hub_cache(root: Path, repo: str, folder: Path, files: list[str]) -> Path:
    """A Hugging Face cache holding `files` of `folder` as the snapshot of `repo` at "main" (the hub's layout:
    models--<owner>--<name>/refs/main names the commit, snapshots/<commit>/ holds the files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    for rel in files:
        (entry / "snapshots" / commit / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / rel, entry / "snapshots" / commit / rel)
    return root


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, as a job started with them sees them (huggingface_hub reads both
    when it is imported, which this process did long ago)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))


def test_a_hub_id_is_read_from_its_four_config_files_alone(saved, tmp_path, monkeypatch):
    """Offline, from a cache that holds the configs but no weights: model_info reads them (the driver never downloads
    a model); with the weights cached too, it equals the pipeline load_pipeline loads from the same cache."""
    _, folder = saved
    configs = ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    use_hub_cache(monkeypatch, hub_cache(tmp_path / "configs-only", "someone/tiny-dit", folder, configs))
    info = model_info("someone/tiny-dit")
    assert info.class_names == ["ant", "bee", "cow"] and info.spec.num_classes == 3
    with pytest.raises(ModelSourceError, match="'someone/tiny-dit'.*hub"):
        load_pipeline("someone/tiny-dit")  # no weights in this cache
    every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    use_hub_cache(monkeypatch, hub_cache(tmp_path / "whole", "someone/tiny-dit", folder, every))
    whole = model_info("someone/tiny-dit")
    assert (whole.spec, whole.class_names) == loaded("someone/tiny-dit")
    use_hub_cache(monkeypatch, hub_cache(tmp_path / "half", "someone/half-dit", folder, ["model_index.json"]))
    with pytest.raises(ModelSourceError, match=r"'someone/half-dit' from the Hugging Face hub \(LocalEntryNotFound"):
        model_info("someone/half-dit")  # offline, a file its cached snapshot lacks is the hub's to give


def test_a_bundled_shape_is_the_hub_models():
    """facebook/DiT-XL-2-256 as published: 1,000 classes, 4x32x32 latents, 256 px, learned sigma, T = 1,000."""
    spec = bundled_model_info("facebook/DiT-XL-2-256").spec
    assert (spec.num_classes, spec.latent_shape, spec.resolution) == (1000, (4, 32, 32), 256)
    assert spec.learned_sigma and spec.num_train_timesteps == 1000 and spec.scaling_factor == 0.18215
    assert bundled_model_info("facebook/DiT-XL-2-512").spec.resolution == 512 and len(BUNDLED_SHAPES) == 2


@pytest.mark.parametrize("reader", [model_info, load_pipeline], ids=["model_info", "load_pipeline"])
def test_both_readers_refuse_a_wrong_source_saying_what_works(reader, tmp_path, s3_env, monkeypatch):
    """What a driver reads (the configs) and what an actor loads (the pipeline) refuse the same sources alike."""
    with pytest.raises(ModelSourceError, match=r"built-in model 'builtin:cifar'; built-in models: builtin:digits"):
        reader("builtin:cifar")
    with pytest.raises(ModelSourceError, match="no/such/folder.*s3://"):
        reader("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="empty has no model_index.json"):
        reader(tmp_path / "empty")
    s3_env.create_bucket(Bucket="void")
    with pytest.raises(ModelSourceError, match="s3://void/nothing"):
        reader("s3://void/nothing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_hub_cache(monkeypatch, tmp_path / "empty-hub-cache")
    with pytest.raises(ModelSourceError, match=r"'someone/some-dit'.*hub.*local.*s3://"):
        reader("someone/some-dit")


def test_a_file_or_a_half_written_folder_is_refused_naming_what_is_missing(tmp_path):
    (tmp_path / "file").write_text("{}")
    with pytest.raises(ModelSourceError, match="file has no model_index.json"):
        model_info(tmp_path / "file")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text(json.dumps({"id2label": {"0": "a"}}))
    with pytest.raises(ModelSourceError, match="half has no transformer/config.json"):
        model_info(tmp_path / "half")


def test_the_distill_driver_never_imports_diffusers():
    """The driver's modules, the actor classes it hands to map_batches, and open_job on the bundled model and on
    digits (what every distill run does before Ray starts): diffusers is not imported. Only the model actors load
    it (models/loading.py), and a --dry-run, which counts FLOPs on the models."""
    code = (
        "import sys\n"
        "import d3hr_ray.distill, d3hr_ray.workers.actors\n"
        "from d3hr_ray.config import DistillConfig\n"
        "from d3hr_ray.flags import config_from_args\n"
        "from d3hr_ray.steps.inputs import open_job\n"
        "job = open_job(config_from_args(DistillConfig, ['--data', 'digits:test', '--classes', '0,1']))\n"
        "assert job.info.class_names[:2] == ['0', '1'] and sorted(job.listing.counts) == [0, 1]\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
