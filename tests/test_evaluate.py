"""train_teacher and evaluate on Ray Train (local Ray, CPU workers, digits at 16 px, a few epochs)."""

import json

import numpy as np
import pytest
import ray

from d3hr_ray.evaluate import EvaluateConfig, main, run
from d3hr_ray.evaluation.records import EvaluationResults, table_row
from d3hr_ray.flags import ConfigError, config_from_args
from d3hr_ray.seeding import derive_seed


def ev(*argv):
    return config_from_args(EvaluateConfig, list(argv))


def _one_finished_mlflow_run(store: str, saved: dict, out) -> None:
    """The first run, its rerun and the refused rerun all went to one MLflow run, which holds the results."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("d3hr_ray.evaluate").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "two"  # the refused rerun did not mark it FAILED
    assert run.data.params["baseline"] == "herding" and run.data.params["repeats"] == "2"
    assert run.data.metrics["top1_mean"] == pytest.approx(saved["top1_mean"])
    for rec in saved["per_repeat"]:  # each repeat's curve under its seed, logged by the workers' rank 0
        got = client.get_metric_history(run.info.run_id, f"seed-{rec['seed']}/top1")
        assert [(m.step, m.value) for m in got] == [(h["epoch"], pytest.approx(h["top1"])) for h in rec["history"]]
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert names == ["results.json", "results.md", "top1-by-epoch.png"]
    logged = open(client.download_artifacts(run.info.run_id, "results.json")).read()
    assert logged == (out / "results.json").read_text()  # the rerun's, which holds the same repeats


def ev_args(teacher: dict, root, *, epochs: int, eval_every: int, repeats: int, workers: int, output: str) -> list[str]:
    """The flags of the herding, soft-label runs below (one name, "two", one Ray Train storage under root)."""
    return [
        *("--baseline", "herding", "--labels", "soft", "--real", "digits:train", "--ipc", "2"),
        *("--test", "digits:test", "--teacher", teacher["output"], "--epochs", str(epochs)),
        *("--eval-every", str(eval_every), "--repeats", str(repeats), "--num-workers", str(workers)),
        *("--output", output, "--storage-path", str(root / "runs"), "--name", "two"),
    ]


@pytest.fixture(scope="module")
def two_workers(digits_teacher, tmp_path_factory):
    """evaluate with the herding baseline and fixed soft labels: 2 repeats of 4 epochs on 2 workers, logged to MLflow.
    One Ray Train run a repeat serves both tests below (each run costs this module about 30 s on 2 cores); kd, the
    default regime, runs end to end in tests/system/test_submit.py. Returns (result, output folder, store, root)."""
    root = tmp_path_factory.mktemp("two")
    store = f"file://{root / 'mlruns'}"
    flags = ev_args(digits_teacher, root, epochs=4, eval_every=2, repeats=2, workers=2, output=str(root / "eval"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        res = run(ev(*flags, "--mlflow", store), command="cmd")
    return res, root / "eval", store, root


def test_two_workers_write_results(two_workers, digits_teacher):
    res, out, store, root = two_workers
    saved = json.loads((out / "results.json").read_text())
    assert saved["repeats"] == 2 and [r["seed"] for r in saved["per_repeat"]] == [0, 1]
    assert all(
        r["train_images"] == 20 and r["train_refused"] == 0 for r in saved["per_repeat"]
    )  # 2 per class x 10 classes
    assert all(
        r["settings"]["epochs"] == 4 and r["settings"]["ipc"] == 2 and r["settings"]["crop_scale"] == [0.08, 1.0]
        for r in saved["per_repeat"]
    )
    assert all(r["test_images"] == 449 for r in saved["per_repeat"])
    assert [h["epoch"] for h in saved["per_repeat"][0]["history"]] == [2, 4]
    top1 = np.array([r["best_top1"] for r in saved["per_repeat"]]) * 100
    assert saved["top1_mean"] == pytest.approx(top1.mean()) and saved["top1_std"] == pytest.approx(top1.std())
    assert res == EvaluationResults.from_json((out / "results.json").read_bytes())  # the job returns what it saved
    assert all(r.best_top1 == max(h["top1"] for h in r.history) for r in res.per_repeat)
    assert (out / "results.md").read_text() == table_row(res) + "\n"
    assert (out / "results.md").read_text().startswith("| herding, IPC 2 | conv3 | soft | 2 |")
    assert res.labels == "soft" and all(r.settings["labels"] == "soft" for r in res.per_repeat)
    flags = ev_args(digits_teacher, root, epochs=4, eval_every=2, repeats=2, workers=2, output=str(out))
    # A rerun skips the finished repeats: same numbers, no training.
    again = run(ev(*flags, "--mlflow", store))
    assert again.per_repeat == res.per_repeat
    # A rerun into the same output with a setting the results depend on changed is refused, naming it.
    with pytest.raises(ValueError, match=r"\(epochs, eval_every differ\).*another --output"):
        run(
            ev(
                *ev_args(digits_teacher, root, epochs=6, eval_every=3, repeats=2, workers=2, output=str(out)),
                "--mlflow",
                store,
            )
        )
    # So is a stored repeat of another label regime, naming --labels.
    with pytest.raises(ValueError, match=r"\(labels differ\)"):
        run(ev(*[f if f != "soft" else "hard" for f in flags]))
    assert json.loads((out / "results.json").read_text())["per_repeat"] == saved["per_repeat"]  # left as it was
    _one_finished_mlflow_run(store, saved, out)
    # The same run name continued to more epochs, into another output and on one worker instead of two (an elastic
    # cluster that shrank): the first repeat resumes from its checkpoint.
    more = run(
        ev(*ev_args(digits_teacher, root, epochs=6, eval_every=2, repeats=1, workers=1, output=str(root / "more")))
    )
    history = more.per_repeat[0].history
    assert [h["epoch"] for h in history] == [2, 4, 6]
    assert history[:2] == saved["per_repeat"][0]["history"]  # epochs 1-4 came from the checkpoint, not rerun


def test_errors_name_the_flag(capsys):
    with pytest.raises(ConfigError, match="--distilled"):
        EvaluateConfig()
    with pytest.raises(ConfigError, match="--ipc"):
        ev("--baseline", "random-real", "--real", "digits:train")
    with pytest.raises(ConfigError, match="--student"):
        ev("--distilled", "x", "--student", "resnet7")
    with pytest.raises(ConfigError, match="--labels"):
        ev("--distilled", "x", "--teacher", "t", "--labels", "mixed")
    with pytest.raises(ConfigError, match="--teacher"):
        ev("--distilled", "x")  # kd needs the teacher
    with pytest.raises(ConfigError, match="--teacher"):
        ev("--baseline", "herding", "--real", "digits:train", "--ipc", "1", "--labels", "hard")  # features need it
    assert ev("--distilled", "x", "--labels", "hard").teacher is None
    assert main(["--baseline", "full"]) == 2
    assert "--real" in capsys.readouterr().err


def test_coresets_equal_plain_loops_on_the_teachers_features(two_workers, digits_teacher, tmp_path):
    """The herding run's chosen keys (the two-worker run above), and k-center's choice alone (no student): they
    equal plain herding and k-center loops written here on the teacher's features. (Hard labels in the loop: the
    same `batch_loss` call, checked against numpy in tests/training/test_classifier_loop.py.)"""
    import torch

    from d3hr_ray.data.sources import list_source, read_shard
    from d3hr_ray.diagnose.sets import rows_of_source, stack_pixels
    from d3hr_ray.evaluation.baselines import Chooser
    from d3hr_ray.evaluation.teacher import features_and_logits, load_teacher
    from d3hr_ray.training.protocol import normalize

    _, out, _, root = two_workers
    chosen = json.loads((out / "sets" / "seed-0.json").read_text())
    assert chosen["baseline"] == "herding" and sorted(chosen["keys"]) == [str(i) for i in range(10)]
    assert json.loads((out / "sets" / "seed-1.json").read_text())["keys"] == chosen["keys"]  # herding draws nothing

    # The teacher's features of every digits:train image, computed here, and the two rules as plain loops.
    model, meta = load_teacher(digits_teacher["output"])
    items, labels = rows_of_source("digits:train", meta["class_names"])
    listing = list_source("digits:train", model_names=meta["class_names"], num_model_classes=10)
    keys = [row["key"] for s in listing.shards for row in read_shard(s)]
    feats, _ = features_and_logits(
        model, normalize(torch.from_numpy(stack_pixels(items, 16)), meta["mean"], meta["std"])
    )
    k_flags = ev_args(digits_teacher, root, epochs=2, eval_every=2, repeats=1, workers=1, output=str(tmp_path / "k"))
    k_center = Chooser(
        ev(*[f if f != "herding" else "k-center" for f in k_flags]),
        meta["class_names"],
        10,
        ray.put((meta, {n: t.detach().cpu() for n, t in model.state_dict().items()})),
        str(tmp_path / "spill"),
    ).keys(seed=3)[0]
    for c in range(10):
        rows = sorted((k, i) for i, k in enumerate(keys) if labels[i] == c)  # by key, as the rules see them
        u = torch.nn.functional.normalize(feats[[i for _, i in rows]].double(), dim=1).numpy()
        mu, total, herded = u.mean(0), 0 * u[0], []
        for step in range(2):
            d = [np.inf if j in herded else np.sum((mu - (total + u[j]) / (step + 1)) ** 2) for j in range(len(u))]
            herded.append(int(np.argmin(d)))
            total = total + u[herded[-1]]
        assert [k for k, _ in chosen["keys"][str(c)]] == sorted(
            rows[j][0] for j in herded
        )  # the file lists them by key
        first = int(np.random.default_rng(derive_seed(3, "k-center", c)).integers(len(u)))
        far = int(np.argmax(np.linalg.norm(u - u[first], axis=1)))
        assert {k for k, (y, _) in k_center.items() if y == c} == {rows[first][0], rows[far][0]}


def test_dry_run_prints_what_would_be_trained_without_training(tmp_path, monkeypatch, capsys):
    """--dry-run with a torchvision teacher whose file is absent: the plan from the listings and the weights'
    metadata (ImageNet's 1,000 classes, wnid folders mapped to them), no Ray, no download, nothing written."""
    import math

    from tests.data.conftest import png

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("--dry-run started Ray"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for split, per_class in (("train", 7), ("val", 3)):
        for wnid in ("n01440764", "n01443537", "n03888257"):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                (tmp_path / split / wnid / f"{i}.png").write_bytes(png(i, 12))
    argv = [
        "--baseline",
        "random-real",
        "--real",
        str(tmp_path / "train"),
        "--ipc",
        "5",
        "--test",
        str(tmp_path / "val"),
    ]
    argv += ["--teacher", "torchvision:resnet18:IMAGENET1K_V1", "--student", "resnet18", "--epochs", "300"]
    argv += ["--batch-size", "4", "--output", str(tmp_path / "out"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    images = 3 * min(7, 5)
    assert f"{images} images in 3 of 1,000 classes" in out and "test      9 images" in out
    assert "student   resnet18 at 224 px, kd labels, AdamW lr 0.001" in out
    assert "teacher   torchvision:resnet18:IMAGENET1K_V1 (resnet18)" in out
    assert f"{tmp_path}/torch-home/hub/checkpoints/resnet18-f37072fd.pth (missing" in out
    steps = math.ceil(images / 4)
    assert f"300 epochs x {steps} batches of 4 = {300 * steps:,} steps a repeat, 3 repeat(s)" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "torch-home").exists()
