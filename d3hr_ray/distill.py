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

from d3hr_ray.config import DistillConfig

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
    if num_gpus > 0 and gpus < num_gpus:  # an autoscaling GPU group at 0 nodes (cluster/): its nodes come on demand
        print(f"--num-gpus {num_gpus:g}: the Ray cluster has {gpus:g} GPUs now; the model actors wait for GPU nodes "
              "(an autoscaler adds them; on a cluster that has none, stop the job and drop --num-gpus)", flush=True)
    if cfg.num_gpus is None and num_gpus == 0:  # auto found no GPU: say so, an autoscaling GPU group looks like this too
        print("no GPUs in the Ray cluster now: the model actors run on CPUs (on a cluster whose GPU nodes an autoscaler "
              "adds on demand, pass --num-gpus 1 and --max-actors)", flush=True)
    device = "cuda" if num_gpus > 0 else "cpu"
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" else "float32")
    # Model actors the cluster holds now: one per GPU share, or one per CPU. The pools start with these
    # (`initial`) and grow to `actors` as nodes join: a pool started at one actor took ~20 s per extra
    # actor to grow, which on a short compute-bound stage left cores idle (docs/performance.md).
    fit = max(1, int(gpus // num_gpus)) if num_gpus > 0 else max(1, int(cpus))
    custom = cfg.actor_resource_map
    for name, amount in custom.items():  # --actor-resources: no more actors at start than the nodes declaring them hold
        if total.get(name, 0) < amount:  # an autoscaler may add such a node; a fixed cluster would wait forever, so say it
            print(f"--actor-resources {name}={amount:g}: no node in the Ray cluster declares {name!r} yet; the model actors wait "
                  "for one (an autoscaling worker group that declares it, or `ray start --resources`)", flush=True)
        fit = max(1, min(fit, int(total.get(name, 0) // amount)))
    actors = cfg.max_actors or fit
    from d3hr_ray.pipeline.actors import default_batch_size

    # CPU model actors: one per core, single-threaded, half a CPU each in Ray's accounts (the other half of
    # the cluster is left to read tasks). One thread per actor keeps the statistics identical bit for bit
    # whatever the cluster's size (torch's CPU kernels round differently with 1 and 2+ threads), and one
    # actor per core keeps every core on the DiT's matrix work: one 1-thread actor on a 2-core machine ran
    # the Ray job at half the speed of one process (docs/performance.md). GPU actors: one per GPU.
    return {"device": device, "dtype": dtype, "num_gpus": num_gpus, "actors": actors, "initial_actors": fit, "resources": custom or None,
            "actor_cpus": 1.0 if device == "cuda" else _CPU_ACTOR_CPUS, "actor_threads": 1,
            "batch_size": cfg.batch_size or default_batch_size(device)}


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Joins RAY_ADDRESS (set by `ray job submit` and on clusters) or starts a local instance.
        ray.init(log_to_driver=True, include_dashboard=False)


def stats_actors(shards: list[dict], batch_size: int, actors: int) -> int:
    """Model actors for the statistics stage: `actors`, but no more than the sub-batches `read_batches` cuts
    from `shards` (at least one per shard). A small job (a few classes, the last shards of a resumed run)
    leaves the rest of the cluster's GPUs alone and loads no model that would get no work."""
    units = sum(max(1, -(-s.inputs // batch_size)) for s in shards)
    return max(1, min(actors, units))


def _pool(actors: int, initial: int):
    """An autoscaling actor pool: starts `initial` actors at once, grows to `actors` as nodes join
    (noticed within ~20 s), outlives node loss.

    Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1: an actor that dies
    with its node is restarted on another node (its model loaded again) and its in-flight and queued
    batches are resubmitted to it. A batch's result is a pure function of its input, so a retry
    changes nothing, and the driver receives each batch's result once.
    """
    import ray

    return ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=max(1, min(initial, actors)))


def _configure_data_context() -> None:
    """Fault tolerance on purpose: an actor whose constructor dies (e.g. out of memory while loading
    the model) is replaced a few times before the job fails, instead of failing at the first death."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if ctx.max_consecutive_actor_init_deaths == 0:  # Ray's default: fail at the first death; -1 (unlimited) is kept
        ctx.max_consecutive_actor_init_deaths = _ACTOR_INIT_RETRIES


# CPUs per read task: 1, the default of the streaming repartition that follows it, so that Ray Data fuses
# the two into one task (read a shard, emit a block per sub-batch). With any other value the repartition
# runs as separate 1-CPU tasks: an extra copy of every block, and on a node with less than a CPU to spare
# besides its model actor, a stall (seen with 2-CPU test nodes). The read is not fused into the model
# actors: Ray Data never fuses a streaming repartition into the map after it (so a shard's sub-batches
# still spread over the pool, and decoding overlaps the model's work).
_READ_CPUS = 1.0
# Ray CPUs of a CPU model actor (it runs one torch thread; see _resources).
_CPU_ACTOR_CPUS = 0.5
# Consecutive actor-constructor deaths tolerated before the job fails (Ray's default is 0).
_ACTOR_INIT_RETRIES = 3
# Seconds between progress lines in the job's log.
_PROGRESS_EVERY_S = 30.0


class _Progress:
    """A log line every _PROGRESS_EVERY_S seconds (and at the end): done/total, images/s, time left."""

    def __init__(self, what: str, unit: str, total: int, already: int):
        self.what, self.unit, self.total, self.already = what, unit, total, already
        self.new = self.images = 0
        self.t0 = self.last = time.perf_counter()
        print(f"{what}: {total} {unit}, {already} already done, {total - already} to compute", flush=True)

    def step(self, images: int) -> None:
        self.new += 1
        self.images += images
        now = time.perf_counter()
        done = self.already + self.new
        if now - self.last >= _PROGRESS_EVERY_S or done == self.total:
            self.last = now
            took = max(now - self.t0, 1e-9)
            left_min = took / self.new * (self.total - done) / 60
            print(f"{self.what}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%), "
                  f"{self.images / took:.1f} images/s, about {left_min:.1f} min left", flush=True)


def _statistics(cfg: DistillConfig, info, res: dict, listing, state, report: dict, timings: dict):
    """Stages 1-3: partial statistics of every unfinished shard, then all shards merged in id order.

    Returns (ClassStats, read counts (C,), skipped inputs [[location, label, reason], ...]).
    """
    import torch

    from d3hr_ray.pipeline.actors import EncodeInvertStats, EncodeSpec, unpack_partial
    from d3hr_ray.data.sources import read_batches
    from d3hr_ray.pipeline.datasets import descriptor_dataset
    from d3hr_ray.stages.stats import ClassStats, merge_partials

    spec = info.spec
    done = state.finished_shards()
    if cfg.keep_latents:  # a shard finished by a run without --keep-latents is computed again, for its latents
        done &= state.finished_latents()
    todo = [s for s in listing.shards if s.id not in done]
    report["resume"]["shards"] = {"total": len(listing.shards), "reused": len(listing.shards) - len(todo), "computed": len(todo)}
    t = time.perf_counter()
    computed_images = 0
    if todo:
        ds = descriptor_dataset(todo).map_batches(
            read_batches, fn_kwargs={"resolution": spec.resolution, "batch_size": res["batch_size"]}, batch_size=1,
            num_cpus=_READ_CPUS, batch_format="numpy",
        ).repartition(target_num_rows_per_block=1)  # a block per sub-batch: any actor takes any sub-batch
        enc = EncodeSpec(model=cfg.model, device=res["device"], dtype=res["dtype"], mode=cfg.encode, seed=cfg.seed, steps=cfg.steps,
                         inversion_step=cfg.inversion_step, guidance=cfg.guidance, threads=res["actor_threads"],
                         chunk=cfg.batch_size is None, compile=cfg.compile, keep_latents=cfg.keep_latents)
        actors = stats_actors(todo, res["batch_size"], res["actors"])
        ds = ds.map_batches(EncodeInvertStats, fn_constructor_args=(enc,), batch_size=1, compute=_pool(actors, res["initial_actors"]),
                            num_gpus=res["num_gpus"], num_cpus=res["actor_cpus"], resources=res["resources"], batch_format="numpy")
        progress = _Progress("statistics", "shards", len(listing.shards), len(listing.shards) - len(todo))
        pending: dict[int, dict[int, tuple]] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            kept = batch["latents"] if cfg.keep_latents else [None] * len(batch["shard"])
            for shard, part, parts, blob, text, lat in zip(batch["shard"], batch["part"], batch["parts"], batch["partial"],
                                                           batch["meta"], kept):
                meta = json.loads(text)
                if cfg.strict and meta["skipped"]:
                    loc, _, why = meta["skipped"][0]
                    raise JobError(f"--strict: {loc}: {why}")
                pending.setdefault(int(shard), {})[int(part)] = (unpack_partial(blob), meta, lat)
                if len(pending[int(shard)]) < int(parts):
                    continue
                got = pending.pop(int(shard))
                items = [got[p] for p in range(int(parts))]  # fixed order: bit-identical on every run
                read: dict[int, int] = {}
                for _, m, _ in items:
                    for c, k in m["read"].items():
                        read[int(c)] = read.get(int(c), 0) + k
                n_img = sum(len(m["labels"]) for _, m, _ in items)
                if cfg.keep_latents:  # before the shard's statistics file, which marks the shard finished
                    z = np.concatenate([np.frombuffer(bytes(b), dtype=np.float16).reshape(-1, spec.latent_dim) for _, _, b in items])
                    state.write_latents(int(shard), torch.from_numpy(z), [y for _, m, _ in items for y in m["labels"]],
                                        [k for _, m, _ in items for k in m["keys"]])
                state.write_shard(int(shard), merge_partials([p for p, _, _ in items], spec.latent_dim), read,
                                  [s for _, m, _ in items for s in m["skipped"]])
                computed_images += n_img
                progress.step(n_img)
    timings["encode+invert+stats"] = (computed_images, time.perf_counter() - t)

    t = time.perf_counter()
    names = [listing.names.get(i, str(i)) for i in range(spec.num_classes)]
    stats = ClassStats(spec.num_classes, spec.latent_dim, class_names=names)
    read = np.zeros(spec.num_classes, dtype=np.int64)
    skipped = [[loc, -1, why] for loc, why in listing.skipped]
    missing = sorted({s.id for s in listing.shards} - state.finished_shards())
    if missing:
        raise JobError(f"{len(missing)} shard(s) have no statistics after the run (first: {missing[0]}); rerun the same command to compute them")
    for _, (partial, shard_read, shard_skipped) in state.iter_shards([s.id for s in listing.shards]):
        stats.merge_partial(partial)
        for c, k in shard_read.items():
            read[c] += k
        skipped.extend(shard_skipped)
    timings["merge shards"] = (len(listing.shards), time.perf_counter() - t)
    return stats, read, skipped


def _generate(cfg: DistillConfig, info, res: dict, mean, var, names: dict[int, str], out, state, output_size: int,
              report: dict, timings: dict):
    """Stages 4-5 for every class without a finished state file, then the outputs assembled from all classes."""
    import ray

    from d3hr_ray.pipeline.actors import GenerateClasses, GenerateSpec
    from d3hr_ray.pipeline.outputs import assemble, image_path

    done = state.finished_classes() & set(names)
    todo = sorted(set(names) - done)
    report["resume"]["classes"] = {"total": len(names), "reused": len(done), "computed": len(todo)}
    t = time.perf_counter()
    select_s = generate_s = 0.0
    if todo:
        stats_ref = [ray.put((mean, var))]
        gen = GenerateSpec(model=cfg.model, device=res["device"], dtype=res["dtype"], ipc=cfg.ipc, candidates=cfg.candidates,
                           seed=cfg.seed, weights=tuple(cfg.score_weights), latents=cfg.latents, steps=cfg.steps,
                           start_step=cfg.generation_start, guidance=cfg.guidance, output_size=output_size, threads=res["actor_threads"],
                           compile=cfg.compile)
        ds = ray.data.from_items([{"label": c} for c in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(GenerateClasses, fn_constructor_args=(gen, stats_ref), batch_size=1,
                            compute=_pool(min(res["actors"], len(todo)), res["initial_actors"]), num_gpus=res["num_gpus"], num_cpus=res["actor_cpus"],
                            resources=res["resources"], batch_format="numpy")
        progress = _Progress("generation", "classes", len(names), len(done))
        rows: dict[int, dict[int, tuple]] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for c, k, png, lat, score, s_sel, s_gen in zip(batch["label"], batch["k"], batch["png"], batch["latent"], batch["score"],
                                                           batch["select_s"], batch["generate_s"]):
                c = int(c)
                rows.setdefault(c, {})[int(k)] = (bytes(png), lat, float(score))
                select_s += float(s_sel)
                generate_s += float(s_gen)
                if len(rows[c]) < cfg.ipc:
                    continue
                got = rows.pop(c)
                pngs = [got[i][0] for i in range(cfg.ipc)]
                for i, png_i in enumerate(pngs):  # the images first: the class file below marks them finished
                    out.write_bytes(image_path(names[c], i), png_i)
                state.write_class(c, np.stack([got[i][1] for i in range(cfg.ipc)]), pngs, got[0][2])
                progress.step(cfg.ipc)
    n = len(todo) * cfg.ipc
    timings["select+generate"] = (n, time.perf_counter() - t)
    timings["  select (actor s)"] = (len(todo) * cfg.candidates, select_s)
    timings["  sample+decode (actor s)"] = (n, generate_s)
    t = time.perf_counter()
    files, scores = assemble(out, state, names, cfg.ipc, info.spec.latent_shape)
    timings["assemble outputs"] = (len(names) * cfg.ipc, time.perf_counter() - t)
    return files, scores


def _select_real(cfg: DistillConfig, info, mean, var, names: dict[int, str], out, state, output_size: int, listing,
                 report: dict, timings: dict):
    """--candidates-from real: stage 4 over each class's real latents, the chosen inputs as the distilled images.

    The latents are this run's (--keep-latents) or those of the --from-stats run's folder. Per-class state
    files make it resumable, as generation is. Returns (files, class id -> score, class id -> chosen keys).
    """
    from d3hr_ray.io.fs import OutputDir
    from d3hr_ray.pipeline.outputs import assemble, image_path
    from d3hr_ray.pipeline.real_candidates import class_shards, read_real_images, select_real_classes
    from d3hr_ray.data.sources import list_source
    from d3hr_ray.pipeline.state import RunState

    if cfg.from_stats:  # the latents and the listing of the run that wrote the statistics
        source = RunState(OutputDir(cfg.from_stats.rsplit("/", 1)[0] if "/" in cfg.from_stats else "."))
        run = source.load_run()
        shard_ids = sorted(source.finished_latents())
        if run is None or not shard_ids:
            raise JobError(f"--candidates-from real: no kept latents beside {cfg.from_stats}; compute the statistics with --keep-latents")
        key = run["stats"]
        shards = list_source(key["data"], model_names=info.class_names, num_model_classes=info.spec.num_classes,
                             classes=key["classes"], shard_size=key["shard_size"]).shards
    else:
        source, shard_ids, shards = state, [s.id for s in listing.shards], listing.shards
    done = state.finished_classes() & set(names)
    todo = sorted(set(names) - done)
    report["resume"]["classes"] = {"total": len(names), "reused": len(done), "computed": len(todo)}
    t = time.perf_counter()
    if todo:
        shards_of = class_shards(source, shard_ids)
        progress = _Progress("real-candidate selection", "classes", len(names), len(done))
        try:
            batches = list(select_real_classes(source.out.uri, shards_of, todo, mean, var, ipc=cfg.ipc, candidates=cfg.candidates,
                                               seed=cfg.seed, weights=tuple(cfg.score_weights)))
            chosen = {str(k): int(sh) for b in batches for k, sh in zip(b["key"], b["shard"])}
            pngs = read_real_images(shards, chosen, output_size)
        except ValueError as e:
            raise JobError(f"--candidates-from real: {e}") from None
        rows: dict[int, dict[int, tuple]] = {}
        for b in batches:
            for c, k, key, lat, score in zip(b["label"], b["k"], b["key"], b["latent"], b["score"]):
                rows.setdefault(int(c), {})[int(k)] = (str(key), lat, float(score))
        for c in todo:
            got = [rows[c][k] for k in range(cfg.ipc)]
            images = [pngs[key] for key, _, _ in got]
            for k, png in enumerate(images):  # the images first: the class file below marks them finished
                out.write_bytes(image_path(names[c], k), png)
            state.write_class(c, np.stack([lat for _, lat, _ in got]), images, got[0][2], keys=[key for key, _, _ in got])
            progress.step(cfg.ipc)
    timings["select real+read"] = (len(todo) * cfg.ipc, time.perf_counter() - t)
    t = time.perf_counter()
    files, scores = assemble(out, state, names, cfg.ipc, info.spec.latent_shape)
    timings["assemble outputs"] = (len(names) * cfg.ipc, time.perf_counter() - t)
    return files, scores, {c: state.class_keys(c) for c in sorted(names)}


def _table(timings: dict) -> str:
    lines = [f"{'stage':<28}{'items':>10}{'seconds':>10}{'items/s':>12}"]
    for stage, (n, s) in timings.items():
        lines.append(f"{stage:<28}{n:>10}{s:>10.2f}{(n / s if s > 0 else float('nan')):>12.1f}")
    return "\n".join(lines)


# What --overwrite removes: every file a run writes, nothing else in the folder.
_OUTPUTS = ("_state", "images", "stats.safetensors", "latents.safetensors", "distilled.parquet", "grid.png", "manifest.json")


def _keys(cfg: DistillConfig, res: dict, output_size: int | None) -> tuple[dict, dict | None]:
    """(what the statistics depend on, what the distilled set depends on besides them; None for --stats-only)."""
    stats_key = {"model": cfg.model, "data": cfg.data, "from_stats": cfg.from_stats, "classes": sorted(cfg.classes) if cfg.classes else None,
                 "steps": cfg.steps, "inversion_step": cfg.inversion_step, "guidance": cfg.guidance, "encode": cfg.encode,
                 "seed": cfg.seed, "shard_size": cfg.shard_size, "dtype": res["dtype"], "stats_per_class": cfg.stats_per_class}
    if cfg.stats_only:
        return stats_key, None
    return stats_key, {"ipc": cfg.ipc, "candidates": cfg.candidates, "score_weights": list(cfg.score_weights), "latents": cfg.latents,
                       "start_step": cfg.generation_start, "output_size": output_size,
                       "candidates_from": None if cfg.candidates_from == "gaussian" else cfg.candidates_from}


def _from_stats(cfg: DistillConfig, spec, meta: dict, tensors: dict, timestep: int):
    """(mean, var, count, names to distil, native size) from a statistics file."""
    from d3hr_ray.data.listing import select_classes

    mean, var, n = tensors["mean"], tensors["var"], tensors["count"]
    if mean.shape != (spec.num_classes, spec.latent_dim):
        raise JobError(f"--from-stats: statistics are {mean.shape} but the model needs ({spec.num_classes}, {spec.latent_dim})")
    if meta.get("timestep") and int(meta["timestep"]) != timestep:
        raise JobError(f"--from-stats: statistics are at timestep {meta['timestep']} but --steps/--inversion-step give {timestep}")
    all_names = meta.get("class_names") or [str(i) for i in range(spec.num_classes)]
    have = {all_names[i]: i for i in range(spec.num_classes) if n[i] >= 2}
    try:
        names = select_classes(have, cfg.classes)
    except ValueError:
        missing = [c for c in cfg.classes if c not in have and not (c.isdigit() and int(c) in have.values())]
        raise JobError(f"--classes: {missing[0]!r} has no statistics in {cfg.from_stats}") from None
    return mean, var, n, names, meta.get("native_size")


def run(cfg: DistillConfig) -> dict:
    """Run the job; returns the manifest (also written to the output, whatever the outcome).

    The manifest's "status" is "complete", "incomplete" (some classes could not be distilled: they
    are named in "undistilled") or "failed" (with the reason); the statistics and the state of
    finished work are kept in every case, so the same command resumes.
    """
    from d3hr_ray.io.fs import OutputDir
    from d3hr_ray.models.loading import ModelSourceError, model_info
    from d3hr_ray.pipeline.outputs import read_stats, write_manifest, write_stats
    from d3hr_ray.data.sources import list_source, per_class_subset, source_kind
    from d3hr_ray.pipeline.state import RunState, StateMismatch
    from d3hr_ray.stages.diffusion import ddim_timesteps

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
    timestep = ddim_timesteps(spec, cfg.steps)[cfg.inversion_step]
    listing = None
    if cfg.from_stats:
        mean, var, n, names, native = _from_stats(cfg, spec, stats_meta, tensors, timestep)
    else:
        try:
            source_kind(cfg.data)  # fail before starting Ray on a missing input
            listing = list_source(cfg.data, model_names=info.class_names, num_model_classes=spec.num_classes,
                                  classes=cfg.classes, shard_size=cfg.shard_size)
            if cfg.stats_per_class is not None:  # a seeded subset of each class: fewer inputs to encode and invert
                listing = per_class_subset(listing, cfg.stats_per_class, cfg.seed)
        except (FileNotFoundError, ValueError) as e:
            raise JobError(str(e)) from None
        except OSError as e:  # an unreachable bucket, a permission error: one line, no traceback
            raise JobError(f"--data {cfg.data}: cannot list it ({str(e).splitlines()[0][:300]})") from None
        names, native = listing.names, listing.native_size
        few = [c for c, k in listing.counts.items() if k < 2]
        if few:  # refused before any GPU time is spent: such a class can never have a variance
            shown = ", ".join(f"{names[c]!r} ({listing.counts[c]})" for c in few[:10])
            raise JobError(f"classes need at least 2 images each for their statistics; --data lists fewer for {len(few)} "
                           f"class(es): {shown}{' ...' if len(few) > 10 else ''}; leave them out with --classes")
        if cfg.strict and listing.skipped:
            raise JobError(f"--strict: {listing.skipped[0][0]}: {listing.skipped[0][1]}")

    if cfg.dry_run:  # plan mode: no output is touched, no Ray, no weights
        from d3hr_ray.pipeline.plan import make_plan

        classes = {c: names[c] for c in sorted(names)}
        return {"_plan": make_plan(cfg, spec, info.configs, listing, classes, cfg.output_size or int(native or spec.resolution))}
    try:
        out = OutputDir(cfg.output)
        out.check_writable()
    except OSError as e:
        raise JobError(str(e).splitlines()[0]) from None
    if cfg.overwrite:
        for rel in _OUTPUTS:
            out.remove(rel)
    state = RunState(out)
    _init_ray()
    _configure_data_context()
    res = _resources(cfg)
    output_size = cfg.output_size or int(native or spec.resolution)
    stats_key, gen_key = _keys(cfg, res, output_size)
    try:
        resumed = state.begin(stats_key, listing.fingerprint if listing else None, gen_key)["resumed"]
    except StateMismatch as e:
        raise JobError(str(e)) from None

    report: dict = {"status": "running", "reasons": [], "undistilled": {}, "resume": {"resumed": resumed}}
    counts: dict = {}
    skipped: list = []
    scores: dict = {}
    selected_keys: dict = {}
    try:
        if listing is not None:
            stats, read, skipped = _statistics(cfg, info, res, listing, state, report, timings)
            t = time.perf_counter()
            mean_t, var_t, short = stats.finalise(sorted(names))
            mean, var, n = mean_t.numpy(), var_t.numpy(), stats.count.numpy()
            for c, name in names.items():
                counts[name] = {"read": int(read[c]), "used": int(n[c]), "skipped": int(read[c] - n[c])}
            all_names = [names.get(i, info.class_names[i] if info.class_names else str(i)) for i in range(spec.num_classes)]
            meta = {"model": model, "steps": str(cfg.steps), "inversion_step": str(cfg.inversion_step), "timestep": str(timestep),
                    "guidance": str(cfg.guidance), "encode": cfg.encode, "seed": str(cfg.seed), "data": cfg.data,
                    "class_names": json.dumps(all_names), "native_size": str(native or spec.resolution)}
            write_stats(out, mean, var, n, meta)  # every class's counts, whatever happens next
            timings["write stats"] = (1, time.perf_counter() - t)
            if short:
                report["undistilled"] = {names[c]: f"{int(n[c])} usable image(s); at least 2 are needed for a variance" for c in short}
                report["reasons"].append(f"{len(short)} class(es) cannot be distilled (fewer than 2 usable images): "
                                         + ", ".join(repr(names[c]) for c in short[:10]) + (" ..." if len(short) > 10 else ""))
                if cfg.strict:
                    raise JobError(f"--strict: {report['reasons'][-1]}")
                names = {c: v for c, v in names.items() if c not in short}
        files = []
        if not cfg.stats_only and names and cfg.candidates_from == "real":
            files, scores, selected_keys = _select_real(cfg, info, mean, var, names, out, state, output_size, listing, report, timings)
        elif not cfg.stats_only and names:
            files, scores = _generate(cfg, info, res, mean, var, names, out, state, output_size, report, timings)
        report["status"] = "incomplete" if report["undistilled"] else "complete"
    except BaseException as e:  # KeyboardInterrupt and Ray's errors too: the manifest says what happened
        report["status"] = "failed"
        report["reasons"].append(str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
        raise
    finally:
        timings["total"] = (len(names) * (0 if cfg.stats_only else cfg.ipc), time.perf_counter() - t_start)
        manifest = {
            "status": report["status"],
            "reasons": report["reasons"],
            "undistilled": report["undistilled"],
            "config": cfg.to_dict(),
            "resolved": {**res, "output_size": output_size, "resolution": spec.resolution, "latent_shape": list(spec.latent_shape),
                         "timestep": timestep},
            "class_names": [names[c] for c in sorted(names)],
            "class_ids": sorted(names),
            "counts": counts,
            "skipped": [{"input": loc, "class": (names.get(y) if y >= 0 else None), "reason": r} for loc, y, r in skipped],
            "scores": {names[c]: s for c, s in sorted(scores.items()) if c in names},
            "resume": report["resume"],
            "stages": {k.strip(): {"items": n_, "seconds": round(s, 3), "items_per_s": round(n_ / s, 2) if s > 0 else None}
                       for k, (n_, s) in timings.items()},
            "versions": _versions(),
            "statistics_from": cfg.from_stats,
        }
        if cfg.stats_per_class is not None:
            manifest["stats_subset"] = {"per_class": cfg.stats_per_class, "inputs": sum(listing.counts.values()) if listing else None}
        if selected_keys:  # --candidates-from real: the input each distilled image is
            manifest["selected_keys"] = {names[c]: selected_keys[c] for c in sorted(selected_keys) if c in names}
        try:
            write_manifest(out, manifest)
        except Exception as e:
            if report["status"] != "failed":
                raise
            print(f"warning: could not write manifest.json ({type(e).__name__}: {e})", file=sys.stderr)
    manifest["_table"] = _table(timings)
    manifest["_output"] = out.uri
    return manifest


def _report(cfg: DistillConfig, manifest: dict) -> int:
    """The summary a user reads: the stage table, skips, what was resumed, where the output is; 1 unless complete."""
    if "_plan" in manifest:
        from d3hr_ray.pipeline.plan import format_plan

        print(format_plan(manifest["_plan"], cfg))
        return 0
    print(manifest["_table"])
    n_skip = len(manifest["skipped"])
    if n_skip:
        print(f"skipped {n_skip} input(s); reasons in manifest.json")
    r = manifest["resume"]
    if r.get("resumed"):
        parts = [f"{r[k]['reused']} of {r[k]['total']} {k}" for k in ("shards", "classes") if k in r]
        print(f"resumed: reused {' and '.join(parts)} from an earlier run")
    print(f"output: {manifest['_output']}")
    if manifest["status"] != "complete":
        for reason in manifest["reasons"]:
            print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from d3hr_ray.cli import main_for

    return main_for(argv, cls=DistillConfig, run=run, report=_report, prog="python -m d3hr_ray.distill",
                    description=__doc__, user_errors=(JobError,))


if __name__ == "__main__":
    sys.exit(main())
