"""Driver-side pieces shared by `train_teacher` and `evaluate`: datasets of classifier rows and one Ray Train fit."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["as_classifier_rows", "fit", "fits_cache", "history_of", "open_rows"]


def open_rows(uri: str, *, names: list[str] | None, num_classes: int | None, resolution: int | None):
    """(Source, ray Dataset of classifier rows at R, R) for any source the distill job reads.

    R defaults to the source's native image size. Classes map to `names` (the teacher's) by name, else by position.
    """
    from d3hr_ray.pipeline.sources import open_source

    src = open_source(uri, model_names=names, num_model_classes=num_classes)
    r = resolution or src.native_size
    if not r:
        raise FileNotFoundError(f"{uri}: no readable image to take the resolution from; pass --resolution")
    return src, as_classifier_rows(src.dataset, r), r


def as_classifier_rows(dataset, resolution: int):
    """A source's {item, label, key} rows -> {image uint8 (3, R, R), label, ok} (see `classifier_rows`)."""
    from d3hr_ray.evaluation.data import classifier_rows

    return dataset.map_batches(classifier_rows, fn_kwargs={"resolution": resolution}, batch_format="numpy").drop_columns(["reason"])


def fits_cache(rows: int, resolution: int, cache_gb: float) -> bool:
    """Whether `rows` uint8 images of 3 x R x R fit the per-worker cache."""
    return rows * 3 * resolution * resolution <= cache_gb * 2**30


def fit(loop_cfg: dict, train_ds, test_ds, *, name: str, storage_path: str | None, num_workers: int, use_gpu: bool,
        max_failures: int):
    """Run `classifier_loop` under a TorchTrainer; the train set is split across workers only when not cached."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from d3hr_ray.evaluation.worker import classifier_loop

    storage = storage_path or str(Path("~/ray_results").expanduser())
    trainer = TorchTrainer(
        classifier_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds, "test": test_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if loop_cfg["cache_train"] else ["train"]),
    )
    return trainer.fit()


def history_of(result) -> tuple[list[dict], dict]:
    """(every evaluation's metrics, the best) of a finished run, resumed runs included (kept in the checkpoint)."""
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
    return state["history"], state["best"]
