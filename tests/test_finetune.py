"""The finetune job on Ray Train (local Ray, CPU workers, digits at 8 px, tiny models)."""

import json

import pytest
import torch

from d3hr_ray import build_pipeline, load_pipeline
from d3hr_ray.finetune import FinetuneConfig, run
from d3hr_ray.flags import ConfigError, config_from_args


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init") / "tiny"
    build_pipeline(num_classes=10, class_names=[str(i) for i in range(10)], seed=5).save_pretrained(folder)
    return folder


def ft(*argv):
    return config_from_args(FinetuneConfig, list(argv))


def test_two_workers_lower_the_loss_save_a_loadable_pipeline_and_resume(ray_local, init_dir, tmp_path):
    """One run of 2 epochs on 1 worker, then the same command with 4 epochs on 2 workers (a cluster that grew):
    it continues from the checkpoint, in DDP.

    The DiT's learning rate is constant, so 2 + 2 epochs are a 4-epoch run: the loss must fall over the four.
    """
    from diffusers import DiTPipeline

    run_flags = (
        "--data",
        "digits",
        "--init",
        str(init_dir),
        "--lr",
        "2e-3",
        "--batch-size",
        "64",
        "--storage-path",
        str(tmp_path / "runs"),
        "--name",
        "resumable",
        "--sample-steps",
        "2",
    )
    store = f"file://{tmp_path / 'mlruns'}"
    common = (*run_flags, "--output", str(tmp_path / "out"), "--mlflow", store)
    # diffusers' own label dropout is off in every epoch (it was once switched off inside an assert, which `python
    # -O` strips; tests/test_init.py now keeps asserts out of the package).
    run(ft(*common, "--epochs", "2", "--num-workers", "1"))
    first = json.loads((tmp_path / "out" / "training.json").read_text())
    dit_epochs = [m for m in first["history"] if m["stage"] == "dit"]
    assert len(dit_epochs) == 2 and all(m["builtin_label_dropout"] == 0.0 for m in dit_epochs)
    samples = tmp_path / "out" / "samples"
    stamp = {p.name: p.stat().st_mtime_ns for p in samples.iterdir()}
    second = run(ft(*common, "--epochs", "4", "--num-workers", "2"))
    # Only epochs 3 and 4 ran again: the grids of epochs 1-2 were not rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in samples.iterdir() if p.name in stamp} == stamp
    assert sorted(p.name for p in samples.iterdir()) == [f"epoch-000{i}.png" for i in range(1, 5)]
    assert [m["epoch"] for m in second["history"]] == [0, 1, 2, 3]
    assert second["history"][:2] == first["history"]  # epochs 1-2 carried over from the checkpoint, not rerun
    losses = [m["loss"] for m in second["history"] if m["stage"] == "dit"]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert losses[2] < 1.5 * losses[1]  # continues from the trained weights, not from scratch
    history = json.loads((tmp_path / "out" / "training.json").read_text())["history"]
    assert history[-1]["epoch"] == 3

    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    assert pipe.labels == {str(i): i for i in range(10)}
    trained = load_pipeline(tmp_path / "out").transformer.state_dict()
    start = load_pipeline(init_dir).transformer.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # fine-tuned, not copied

    # Both runs logged into one MLflow run (the second found it in the output's mlflow.json): every DiT epoch's loss
    # once, from rank 0, the pipeline's record and every epoch's sample grid.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (logged,) = client.search_runs([client.get_experiment_by_name("d3hr_ray.finetune").experiment_id])
    # MLflow's parameters are write-once: the run keeps the first command's (2 epochs); the curve has all four.
    assert logged.info.status == "FINISHED" and logged.data.params["epochs"] == "2"
    curve = client.get_metric_history(logged.info.run_id, "dit/loss")
    assert [(m.step, m.value) for m in curve] == [(e, pytest.approx(v)) for e, v in enumerate(losses)]
    assert sorted(a.path for a in client.list_artifacts(logged.info.run_id)) == ["samples", "training.json"]
    grids = sorted(a.path for a in client.list_artifacts(logged.info.run_id, "samples"))
    assert grids == [f"samples/epoch-000{i}.png" for i in range(1, 5)]

    # A rerun of a finished run (nothing trains; the last checkpoint is reported again) is checked in-process in
    # tests/test_harness.py: a third Ray Train run here cost the suite about 35 s.


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--init"):
        FinetuneConfig()  # no VAE to train on
    with pytest.raises(ConfigError, match="--class-dropout"):
        ft("--train-vae", "--class-dropout", "1.5")
