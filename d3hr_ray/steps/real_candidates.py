"""`distill --candidates-from real`: D3HR's group selection over each class's real inverted latents, and
the real images it chooses. It separates the method's criterion from the generator's image quality.

    kept latents of the statistics run (`_state/latents/<shard id>.safetensors`, --keep-latents)
      -> one CPU task per class: the latents of its shards, sorted by input key, `select_real_group`
         against the class statistics -> the chosen keys (and their z_K, score)
      -> the chosen inputs read from the data (their shards narrowed to those keys) -> PNGs at the output size

Which shards hold a class comes from the partial statistics' `classes` (small files), so a task reads only
those latents (one shard per ImageFolder class shard; every shard a class appears in for Parquet).
Determinism: a class's choice depends on (seed, class id, m, IPC) and its latents sorted by key, never
on shards, workers or order. The core (`stages.select.select_real_group`) never sees Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import ray
import torch

from d3hr_ray.artifacts.outputs import Moments, write_class
from d3hr_ray.artifacts.report import Progress, Resumed, Timings
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.data.listing import Shard
from d3hr_ray.data.preprocess import png_batch
from d3hr_ray.data.sources import list_source, read_label_names
from d3hr_ray.errors import JobError
from d3hr_ray.seeding import derive_seed
from d3hr_ray.stages.select import select_real_group
from d3hr_ray.steps.generation import Generated, assemble_outputs
from d3hr_ray.steps.job import Job
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.workers.datasets import rows_dataset
from d3hr_ray.workers.regroup import complete_groups

__all__ = ["choose_real_images", "class_shards", "read_real_images", "select_real_classes"]


def class_shards(state: RunState, shard_ids: list[int]) -> dict[int, list[int]]:
    """Class id -> the ids of the shards among `shard_ids` that hold it (in shard order), from the statistics
    blocks' record of each shard's classes."""
    held = state.shard_classes()
    out: dict[int, list[int]] = {}
    for sid in sorted(shard_ids):
        for c in held.get(sid, []):
            out.setdefault(int(c), []).append(sid)
    return out


def _select_batch(
    batch: dict[str, np.ndarray],
    *,
    state_uri: str,
    shards_of: dict[str, list[int]],
    stats_ref: list[ray.ObjectRef],
    ipc: int,
    candidates: int,
    seed: int,
    weights: tuple[float, ...],
) -> dict[str, np.ndarray]:
    """Ray Data task: class ids -> one row per chosen image {label, k, key, shard, latent (D,) float32, score}."""
    state = RunState(OutputDir(state_uri))
    mean, var = ray.get(stats_ref[0])  # (C, D) float32 each
    rows: dict[str, list] = {"label": [], "k": [], "key": [], "shard": [], "latent": [], "score": []}
    for c in np.asarray(batch["label"], dtype=np.int64).tolist():
        found = []  # (key, shard, latent) of class c
        for sid in shards_of[str(c)]:
            z, labels, keys = state.read_latents(sid)
            found += [(keys[i], sid, z[i]) for i in torch.nonzero(labels == c).flatten().tolist()]
        found.sort(key=lambda t: t[0])  # by input key: independent of shard and worker
        z = torch.stack([t[2] for t in found]).float()  # (N_c, D)
        picked, score = select_real_group(
            z,
            torch.tensor(mean[c]),
            torch.tensor(var[c]).sqrt(),
            ipc=ipc,
            candidates=candidates,
            seed=derive_seed(seed, "select-real", c),
            weights=weights,
        )
        for k, i in enumerate(picked):
            rows["label"].append(c)
            rows["k"].append(k)
            rows["key"].append(found[i][0])
            rows["shard"].append(found[i][1])
            rows["latent"].append(z[i].numpy())
            rows["score"].append(score)
    return {
        "label": np.array(rows["label"], dtype=np.int64),
        "k": np.array(rows["k"], dtype=np.int64),
        "key": np.array(rows["key"], dtype=object),
        "shard": np.array(rows["shard"], dtype=np.int64),
        "latent": np.stack(rows["latent"]).astype(np.float32),
        "score": np.array(rows["score"], dtype=np.float64),
    }


def select_real_classes(
    state_uri: str,
    shards_of: dict[int, list[int]],
    classes: list[int],
    mean: np.ndarray,
    var: np.ndarray,
    *,
    ipc: int,
    candidates: int,
    seed: int,
    weights: tuple[float, ...],
    cpus: float = 1.0,
) -> Iterable[dict[str, np.ndarray]]:
    """Batches of chosen images, one CPU task per class (Ray Data); see `_select_batch` for the rows.

    Raises ValueError naming a class that has fewer kept latents than `ipc` before any task starts.
    """
    missing = [c for c in classes if c not in shards_of]
    if missing:
        raise ValueError(
            f"class id {missing[0]} has no kept latents (was the statistics run made with --keep-latents?)"
        )
    ds = ray.data.from_items([{"label": c} for c in classes], override_num_blocks=max(1, len(classes)))
    kwargs = {
        "state_uri": state_uri,
        "shards_of": {str(c): shards_of[c] for c in classes},
        "stats_ref": [ray.put((mean, var))],
        "ipc": ipc,
        "candidates": candidates,
        "seed": seed,
        "weights": tuple(weights),
    }
    chosen = ds.map_batches(_select_batch, fn_kwargs=kwargs, batch_size=1, num_cpus=cpus, batch_format="numpy")  # type: ignore[arg-type]  # Ray's stub has no keyword-only fn_kwargs form
    return chosen.iter_batches(batch_size=None, batch_format="numpy")


def read_real_images(shards: list[Shard], chosen: dict[str, int], size: int) -> dict[str, bytes]:
    """The chosen inputs (key -> shard id) of a listing's `shards` as PNGs of size x size; only their shards are read.

    Raises ValueError when a chosen input is no longer there or no longer readable (the data changed since
    its latent was computed).
    """
    by_shard: dict[int, list[str]] = {}
    for key, sid in chosen.items():
        by_shard.setdefault(sid, []).append(key)
    narrowed = [s.narrowed(by_shard[s.id]) for s in shards if s.id in by_shard]
    out: dict[str, bytes] = {}
    for b in (
        rows_dataset(narrowed)
        .map_batches(png_batch, fn_kwargs={"size": size}, batch_format="numpy")  # type: ignore[arg-type]  # as above
        .iter_batches(batch_size=None, batch_format="numpy")
    ):
        for key, png, why in zip(b["key"], b["png"], b["reason"], strict=True):
            if why:
                raise ValueError(f"{key}: chosen by --candidates-from real but now unreadable ({why})")
            out[str(key)] = bytes(png)
    lost = sorted(set(chosen) - set(out))
    if lost:
        raise ValueError(
            f"{len(lost)} chosen input(s) are no longer in the data (first: {lost[0]}); the data changed since the "
            "statistics run"
        )
    return out


def choose_real_images(job: Job, stats: Moments, names: dict[int, str], out: OutputDir, state: RunState) -> Generated:
    """--candidates-from real, as a generation stage: stage 4 over each unfinished class's real latents, the
    chosen inputs written as its images; then the outputs from every class.

    The latents are this run's (--keep-latents: the job's listing) or those of the run whose statistics
    --from-stats names (its state and its listing: data, classes, shard size). Per-class state files make it
    resumable, as generation is.
    """
    cfg, spec, listing = job.cfg, job.info.spec, job.data
    if cfg.from_stats:
        source = RunState(OutputDir(cfg.from_stats.rsplit("/", 1)[0] if "/" in cfg.from_stats else "."))
        record = source.load_run()
        shard_ids = sorted(source.finished_latents())
        if record is None or not shard_ids:
            raise JobError(
                f"--candidates-from real: no kept latents beside {cfg.from_stats}; compute the statistics with "
                "--keep-latents"
            )
        key = record["stats"]
        shards = list_source(
            key["data"],
            label_names=read_label_names(key.get("class_names")),
            model_names=job.info.class_names,
            num_model_classes=spec.num_classes,
            classes=key["classes"],
            shard_size=key["shard_size"],
        ).shards
    elif listing is None:  # open_job lists --data for every run without --from-stats
        raise TypeError("--candidates-from real needs the listing of --data")
    else:
        source, shard_ids, shards = state, [s.id for s in listing.shards], listing.shards
    timings = Timings()
    done = state.finished_classes() & set(names)
    todo = sorted(set(names) - done)
    t = time.perf_counter()
    if todo:
        progress = Progress("real-candidate selection", "classes", len(names), len(done))
        try:
            batches = list(
                select_real_classes(
                    source.out.uri,
                    class_shards(source, shard_ids),
                    todo,
                    stats.mean,
                    stats.var,
                    ipc=cfg.ipc,
                    candidates=cfg.candidates,
                    seed=cfg.seed,
                    weights=tuple(cfg.score_weights),
                )
            )
            pngs = read_real_images(
                shards,
                {str(k): int(sh) for b in batches for k, sh in zip(b["key"], b["shard"], strict=True)},
                job.output_size,
            )
        except ValueError as e:
            raise JobError(f"--candidates-from real: {e}") from None
        rows = (
            (int(c), int(k), cfg.ipc, (str(key), lat, float(score)))
            for b in batches
            for c, k, key, lat, score in zip(b["label"], b["k"], b["key"], b["latent"], b["score"], strict=True)
        )
        for c, got in complete_groups(rows):
            images = [pngs[key] for key, _, _ in got]
            latents = np.stack([lat for _, lat, _ in got])
            write_class(out, state, c, names[c], latents, images, got[0][2], keys=[key for key, _, _ in got])
            progress.step(cfg.ipc)
    timings.add("select real+read", len(todo) * cfg.ipc, time.perf_counter() - t)
    files, scores = assemble_outputs(out, state, names, cfg.ipc, spec.latent_shape, timings)
    return Generated(
        files, scores, Resumed(len(names), len(done)), timings, {c: state.class_keys(c) for c in sorted(names)}
    )
