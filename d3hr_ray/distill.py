"""`python -m d3hr_ray.distill`: distil an image data set with D3HR on Ray.

    read -> preprocess (CPU tasks) -> encode + invert + partial statistics (model actors)
         -> merge partials (CPU tasks, then the driver: O(classes x D) memory)
         -> per class: select a group + sample + decode (model actors) -> write

Runs unchanged on a laptop (a local Ray instance is started), on a running cluster (RAY_ADDRESS) and
under `ray job submit`. With no flags it distils scikit-learn's digits with the bundled model into
./d3hr-output/. Flags and a YAML --config take the same keys; flags win.

Outputs: stats.safetensors, latents.safetensors, images/<class>/<k>.png, distilled.parquet,
grid.png, manifest.json (see docs/distill.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from importlib import metadata

import numpy as np

from d3hr_ray.config import ConfigError, DistillConfig, build_parser, config_from_args

__all__ = ["main", "run"]

_BUILTIN_DIGITS = "builtin:digits"


class JobError(RuntimeError):
    """A failure with a message for the user (printed as one line, exit code 1)."""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("d3hr_ray", "torch", "diffusers", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _resources(cfg: DistillConfig) -> dict:
    """Devices, dtype, actor counts from the cluster and the flags."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0 and gpus == 0:
        raise JobError(f"--num-gpus {num_gpus}: the Ray cluster has no GPUs")
    device = "cuda" if num_gpus > 0 else "cpu"
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" else "float32")
    if cfg.max_actors:
        actors = cfg.max_actors
    elif num_gpus > 0:
        actors = max(1, int(gpus // num_gpus))
    else:
        actors = max(1, int(cpus // 2))
    # CPU actors: one core each, the rest left to reading and preprocessing.
    return {"device": device, "dtype": dtype, "num_gpus": num_gpus, "actors": actors, "actor_cpus": 1.0}


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Joins RAY_ADDRESS (set by `ray job submit` and on clusters) or starts a local instance.
        ray.init(log_to_driver=True, include_dashboard=False)


def _statistics(cfg: DistillConfig, info, res: dict, src, timings: dict):
    """Stages 1-3 over the whole source: returns (ClassStats, read counts (C,), skipped list)."""
    import ray

    from d3hr_ray.pipeline.actors import (
        EncodeInvertStats,
        Partial,
        merge_partials,
        preprocess_batch,
    )
    from d3hr_ray.stages.stats import ClassStats

    spec = info.spec
    ds = src.dataset.map_batches(preprocess_batch, fn_kwargs={"resolution": spec.resolution}, batch_size=cfg.batch_size, batch_format="numpy")
    ds = ds.map_batches(
        EncodeInvertStats,
        fn_constructor_kwargs=dict(
            model=cfg.model, device=res["device"], dtype=res["dtype"], mode=cfg.encode, seed=cfg.seed,
            steps=cfg.steps, inversion_step=cfg.inversion_step, guidance=cfg.guidance, threads=res["actor_cpus"],
        ),
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res["actors"]),
        num_gpus=res["num_gpus"],
        num_cpus=res["actor_cpus"],
        batch_format="numpy",
    )
    ds = ds.map_batches(merge_partials, fn_kwargs={"num_classes": spec.num_classes, "dim": spec.latent_dim}, batch_size=16, batch_format="numpy")

    stats = ClassStats(spec.num_classes, spec.latent_dim, class_names=[src.names.get(i, str(i)) for i in range(spec.num_classes)])
    read = np.zeros(spec.num_classes, dtype=np.int64)
    skipped = [[loc, -1, reason] for loc, reason in src.skipped]
    if cfg.strict and skipped:
        raise JobError(f"--strict: {skipped[0][0]}: {skipped[0][2]}")
    t = time.perf_counter()
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        for blob, sk in zip(batch["partial"], batch["skipped"]):
            part = Partial.unpack(blob)
            read += part.pop("read").numpy()
            stats.merge_partial(part)
            bad = json.loads(sk)
            if cfg.strict and bad:
                raise JobError(f"--strict: {bad[0][0]}: {bad[0][2]}")
            skipped.extend(bad)
    timings["encode+invert+stats"] = (int(stats.n.sum()), time.perf_counter() - t)
    return stats, read, skipped


def _finalise(stats, names: dict[int, str]):
    """(mean, var) float32 (C, D) for the distilled classes; a clear error for a class with < 2 images."""
    few = [c for c in names if stats.n[c] < 2]
    if few:
        shown = ", ".join(f"{names[c]} ({int(stats.n[c])} usable)" for c in few[:10])
        raise JobError(f"classes need at least 2 usable images each for their statistics: {shown}")
    state = stats.state_dict()
    n = state["count"].numpy()
    mean = state["mean"].numpy().astype(np.float32)
    var = (state["m2"].numpy() / np.maximum(n - 1, 1)[:, None]).astype(np.float32)
    return mean, var, n


def _generate(cfg: DistillConfig, model: str, info, res: dict, mean, var, names, out, output_size: int, timings: dict):
    import ray

    from d3hr_ray.pipeline.actors import GenerateClasses
    from d3hr_ray.pipeline.outputs import DistilledWriter

    stats_ref = [ray.put((mean, var))]
    ds = ray.data.from_items([{"label": c} for c in sorted(names)])
    ds = ds.map_batches(
        GenerateClasses,
        fn_constructor_kwargs=dict(
            model=model, device=res["device"], dtype=res["dtype"], stats_ref=stats_ref, ipc=cfg.ipc,
            candidates=cfg.candidates, seed=cfg.seed, weights=cfg.score_weights, latents=cfg.latents, steps=cfg.steps,
            start_step=cfg.generation_start, guidance=cfg.guidance, output_size=output_size, threads=res["actor_cpus"],
        ),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(res["actors"], len(names))),
        num_gpus=res["num_gpus"],
        num_cpus=res["actor_cpus"],
        batch_format="numpy",
    )
    writer = DistilledWriter(out, names, cfg.ipc, info.spec.latent_shape)
    t = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
    files = writer.close()
    wall = time.perf_counter() - t
    n = len(names) * cfg.ipc
    timings["select+generate"] = (n, wall)
    timings["  select (actor s)"] = (len(names) * cfg.candidates, writer.select_s)
    timings["  sample+decode (actor s)"] = (n, writer.generate_s)
    return files, writer.scores


def _table(timings: dict) -> str:
    lines = [f"{'stage':<28}{'items':>10}{'seconds':>10}{'items/s':>12}"]
    for stage, (n, s) in timings.items():
        lines.append(f"{stage:<28}{n:>10}{s:>10.2f}{(n / s if s > 0 else float('nan')):>12.1f}")
    return "\n".join(lines)


def run(cfg: DistillConfig) -> dict:
    """Run the job; returns the manifest (also written to the output)."""
    from d3hr_ray.io.fs import OutputDir
    from d3hr_ray.models.loading import ModelSourceError, model_info
    from d3hr_ray.pipeline.outputs import read_stats, write_manifest, write_stats
    from d3hr_ray.pipeline.sources import open_source, source_kind

    t_start = time.perf_counter()
    timings: dict = {}
    stats_meta: dict = {}
    if cfg.from_stats:
        try:
            tensors, stats_meta = read_stats(cfg.from_stats)
        except FileNotFoundError as e:
            raise JobError(f"--from-stats: {e}") from None
    model = cfg.model or stats_meta.get("model") or (_BUILTIN_DIGITS if cfg.data.startswith("digits") else None)
    if model is None:
        raise JobError("--model is required for --data other than digits (a DiTPipeline folder, s3:// prefix or hub id)")
    cfg = dataclasses.replace(cfg, model=model)
    try:
        info = model_info(model)
    except (ModelSourceError, ValueError) as e:
        raise JobError(str(e)) from None
    spec = info.spec
    if not cfg.from_stats:
        try:
            source_kind(cfg.data)  # fail before starting Ray on a missing input
        except (FileNotFoundError, ValueError) as e:
            raise JobError(str(e)) from None
    _init_ray()
    res = _resources(cfg)
    out = OutputDir(cfg.output)

    meta = {
        "model": model, "steps": str(cfg.steps), "inversion_step": str(cfg.inversion_step),
        "timestep": str(cfg.inversion_step * (spec.num_train_timesteps // cfg.steps) + spec.steps_offset),
        "guidance": str(cfg.guidance), "encode": cfg.encode, "seed": str(cfg.seed), "data": cfg.data,
    }
    counts: dict = {}
    skipped: list = []
    if cfg.from_stats:
        mean, var, n = tensors["mean"], tensors["var"], tensors["count"]
        if mean.shape != (spec.num_classes, spec.latent_dim):
            raise JobError(f"--from-stats: statistics are {mean.shape} but the model needs ({spec.num_classes}, {spec.latent_dim})")
        all_names = stats_meta.get("class_names") or [str(i) for i in range(spec.num_classes)]
        have = {i: all_names[i] for i in range(spec.num_classes) if n[i] >= 2}
        names = have
        if cfg.classes:
            by_name = {v: k for k, v in have.items()}
            names = {}
            for c in cfg.classes:
                cid = by_name.get(c, int(c) if c.isdigit() and int(c) in have else None)
                if cid is None:
                    raise JobError(f"--classes: {c!r} has no statistics in {cfg.from_stats}")
                names[cid] = have[cid]
        native = stats_meta.get("native_size")
        if stats_meta.get("timestep") and int(stats_meta["timestep"]) != int(meta["timestep"]):
            raise JobError(
                f"--from-stats: statistics are at timestep {stats_meta['timestep']} but --steps/--inversion-step give {meta['timestep']}"
            )
    else:
        try:
            src = open_source(cfg.data, model_names=info.class_names, num_model_classes=spec.num_classes, classes=cfg.classes)
        except (FileNotFoundError, ValueError) as e:
            raise JobError(str(e)) from None
        names, native = src.names, src.native_size
        stats, read, skipped = _statistics(cfg, info, res, src, timings)
        mean, var, n = _finalise(stats, names)
        for c, name in names.items():
            counts[name] = {"read": int(read[c]), "used": int(n[c]), "skipped": int(read[c] - n[c])}
        all_names = [names.get(i, info.class_names[i] if info.class_names else str(i)) for i in range(spec.num_classes)]
        t = time.perf_counter()
        meta.update(class_names=json.dumps(all_names), native_size=str(native or spec.resolution))
        write_stats(out, mean, var, n, meta)
        timings["write stats"] = (1, time.perf_counter() - t)

    output_size = cfg.output_size or int(native or spec.resolution)
    files, scores = [], {}
    if not cfg.stats_only:
        files, scores = _generate(cfg, model, info, res, mean, var, names, out, output_size, timings)
    timings["total"] = (len(names) * (0 if cfg.stats_only else cfg.ipc), time.perf_counter() - t_start)

    manifest = {
        "config": cfg.to_dict(),
        "resolved": {**res, "output_size": output_size, "resolution": spec.resolution, "latent_shape": list(spec.latent_shape)},
        "class_names": [names[c] for c in sorted(names)],
        "class_ids": sorted(names),
        "counts": counts,
        "skipped": [{"input": loc, "class": (names.get(y) if y >= 0 else None), "reason": r} for loc, y, r in skipped],
        "scores": {names[c]: s for c, s in sorted(scores.items())},
        "stages": {k.strip(): {"items": n_, "seconds": round(s, 3), "items_per_s": round(n_ / s, 2) if s > 0 else None} for k, (n_, s) in timings.items()},
        "versions": _versions(),
        "statistics_from": cfg.from_stats,
    }
    write_manifest(out, manifest)
    manifest["_table"] = _table(timings)
    manifest["_output"] = out.uri
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(description=__doc__)
    try:
        cfg = config_from_args(argv, parser)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        manifest = run(cfg)
    except (JobError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(manifest["_table"])
    n_skip = len(manifest["skipped"])
    if n_skip:
        print(f"skipped {n_skip} input(s); reasons in manifest.json")
    print(f"output: {manifest['_output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
