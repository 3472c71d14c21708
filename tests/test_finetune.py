"""The finetune job on Ray Train (local Ray, CPU workers, digits at 8 px, tiny models)."""

import json

import pytest
import torch

from d3hr_ray import build_pipeline, load_pipeline
from d3hr_ray.config import ConfigError, build_parser, config_from_args
from d3hr_ray.finetune import FinetuneConfig, run


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init") / "tiny"
    build_pipeline(num_classes=10, class_names=[str(i) for i in range(10)], seed=5).save_pretrained(folder)
    return folder


def ft(*argv):
    return config_from_args(list(argv), build_parser(cls=FinetuneConfig))


def test_two_workers_lower_the_loss_and_save_a_loadable_pipeline(ray_local, init_dir, tmp_path):
    from diffusers import DiTPipeline

    cfg = ft("--data", "digits", "--init", str(init_dir), "--epochs", "4", "--lr", "2e-3", "--batch-size", "64",
             "--num-workers", "2", "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "runs"),
             "--name", "two", "--sample-steps", "2")
    out = run(cfg)
    losses = [m["loss"] for m in out["history"] if m["stage"] == "dit"]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    assert pipe.labels == {str(i): i for i in range(10)}
    trained = load_pipeline(tmp_path / "out").transformer.state_dict()
    start = load_pipeline(init_dir).transformer.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # fine-tuned, not copied
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == [f"epoch-000{i}.png" for i in range(1, 5)]


def test_rerun_resumes_from_the_checkpoint(ray_local, init_dir, tmp_path):
    common = ("--data", "digits", "--init", str(init_dir), "--lr", "2e-3", "--batch-size", "64", "--output", str(tmp_path / "out"),
              "--storage-path", str(tmp_path / "runs"), "--name", "resumable", "--sample-steps", "2")
    first = run(ft(*common, "--epochs", "2"))
    samples = tmp_path / "out" / "samples"
    stamp = {p.name: p.stat().st_mtime_ns for p in samples.iterdir()}
    second = run(ft(*common, "--epochs", "4"))
    # Only epochs 3 and 4 ran again: the grids of epochs 1-2 were not rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in samples.iterdir() if p.name in stamp} == stamp
    assert (samples / "epoch-0004.png").exists()
    assert [m["epoch"] for m in second["history"]] == [0, 1, 2, 3]
    assert second["history"][:2] == first["history"]  # epochs 1-2 carried over from the checkpoint, not rerun
    last_first = [m["loss"] for m in first["history"]][-1]
    first_second = [m["loss"] for m in second["history"] if m["epoch"] == 2][0]
    assert first_second < 1.5 * last_first  # continues from the trained weights, not from scratch
    history = json.loads((tmp_path / "out" / "training.json").read_text())["history"]
    assert history[-1]["epoch"] == 3
    # A rerun of a finished run trains nothing and assembles the same pipeline from its last checkpoint.
    third = run(ft(*common, "--epochs", "4", "--output", str(tmp_path / "again")))
    assert third["history"] == second["history"]
    a, b = load_pipeline(tmp_path / "out").transformer.state_dict(), load_pipeline(tmp_path / "again").transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "again" / "samples").exists()


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--init"):
        FinetuneConfig()  # no VAE to train on
    with pytest.raises(ConfigError, match="--class-dropout"):
        ft("--train-vae", "--class-dropout", "1.5")
