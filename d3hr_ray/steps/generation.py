"""D3HR stages 4-5 on Ray: per class, select a group of latents, denoise and decode it; then the outputs.

groups of class ids  -> GenerateClasses (model actors: select_group per class, then sample and decode the
                        group's images together on a GPU, class by class on a CPU)
                     -> one row per image, regrouped per class (`complete_groups`)
                     -> images/<class>/<k>.png, then _state/classes/<id> (which marks the class finished)
every class's state file, in id order -> distilled.parquet, latents.safetensors, grid.png (`outputs.assemble`)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import ray

from d3hr_ray.artifacts.outputs import Moments, assemble, write_class
from d3hr_ray.artifacts.report import Progress, Resumed, Timings
from d3hr_ray.artifacts.state import RunState
from d3hr_ray.steps.job import Job
from d3hr_ray.storage.fs import OutputDir
from d3hr_ray.workers.actors import GenerateClasses, GenerateSpec
from d3hr_ray.workers.regroup import complete_groups
from d3hr_ray.workers.resources import Resources, on_model_actors

__all__ = ["IMAGES_PER_CALL", "Generated", "assemble_outputs", "class_groups", "classes_per_call", "generate_classes"]

# Images one generation call samples and decodes together when --images-per-call is not given, per device type.
# On an H200 (docs/performance.md, "GPU", DiT-XL/2 at 256 px) generation ran at 23.8 % MFU at batch 10 (one class
# at IPC 10), 48.4 % at 50 and 51.5 % at 200. Device types not listed take one class a call: a CPU actor gains
# nothing from batching, and generates a group's classes one by one anyway.
IMAGES_PER_CALL = {"cuda": 200}


def classes_per_call(images_per_call: int | None, device_type: str, ipc: int) -> int:
    """G, the classes one generation call holds: as many whole classes as fit the target images a call
    (--images-per-call, else IMAGES_PER_CALL for the device type), at least one."""
    return max(1, (images_per_call or IMAGES_PER_CALL.get(device_type, ipc)) // ipc)


def class_groups(class_ids: Iterable[int], per_call: int) -> list[list[int]]:
    """The classes to distil in groups of `per_call` consecutive ids (sorted): fixed by class id, so a resumed run
    groups exactly as the first did, whichever classes it has still to do."""
    ids = sorted(int(c) for c in class_ids)
    return [ids[i : i + per_call] for i in range(0, len(ids), per_call)]


@dataclass
class Generated:
    """What a generation stage returns: the files written, each class's score, its chosen input keys when the
    images are real ones (--candidates-from real), how many classes an earlier run had finished, timings."""

    files: list[str]
    scores: dict[int, float]
    classes: Resumed
    timings: Timings
    selected_keys: dict[int, list[str] | None] = field(default_factory=dict)


def generate_classes(
    job: Job, resources: Resources, stats: Moments, names: dict[int, str], out: OutputDir, state: RunState
) -> Generated:
    """Stages 4-5 for every class of `names` without a finished state file, then the outputs from all classes.

    Args:
        stats: the class statistics (mean, var (C, D) float32); names: class id -> name, the classes to distil.
    """
    cfg, spec = job.cfg, job.info.spec
    timings = Timings()
    done = state.finished_classes() & set(names)
    todo = sorted(set(names) - done)
    t = time.perf_counter()
    select_s = generate_s = 0.0
    if todo:
        per_call = classes_per_call(cfg.images_per_call, resources.device, cfg.ipc)
        groups = [g for g in class_groups(names, per_call) if not set(g) <= done]  # a group with any class to do
        gen = GenerateSpec(
            model=job.model,
            device=resources.device,
            dtype=resources.dtype,
            ipc=cfg.ipc,
            candidates=cfg.candidates,
            seed=cfg.seed,
            weights=tuple(cfg.score_weights),
            latents=cfg.latents,
            steps=cfg.steps,
            start_step=cfg.generation_start,
            guidance=cfg.guidance,
            output_size=job.output_size,
            threads=resources.actor_threads,
            compile=False,  # `on_model_actors` decides
            chunk=True,
        )
        ds = on_model_actors(
            ray.data.from_items([{"classes": g} for g in groups], override_num_blocks=len(groups)),
            GenerateClasses,
            gen,
            resources,
            min(resources.actors, len(groups)),
            compile_mode=cfg.compile,
            images=sum(len(g) for g in groups) * cfg.ipc,
            log=f"generation: {per_call} class(es) a call, {len(groups)} call(s); ",
            extra_args=([ray.put((stats.mean, stats.var))],),
        )
        progress = Progress("generation", "classes", len(names), len(done))
        timed = [0.0, 0.0]

        def images() -> Iterator[tuple[int, int, int, tuple[bytes, np.ndarray, float]]]:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for c, k, png, lat, score, s_sel, s_gen in zip(
                    b["label"], b["k"], b["png"], b["latent"], b["score"], b["select_s"], b["generate_s"], strict=True
                ):
                    timed[0] += float(s_sel)
                    timed[1] += float(s_gen)
                    yield int(c), int(k), cfg.ipc, (bytes(png), lat, float(score))

        for c, got in complete_groups(images()):
            if c in done:  # finished by an earlier run; generated again only because its group was not
                continue
            write_class(
                out, state, c, names[c], np.stack([lat for _, lat, _ in got]), [p for p, _, _ in got], got[0][2]
            )
            progress.step(cfg.ipc)
        select_s, generate_s = timed
    n = len(todo) * cfg.ipc
    timings.add("select+generate", n, time.perf_counter() - t)
    timings.add("  select (actor s)", len(todo) * cfg.candidates, select_s)
    timings.add("  sample+decode (actor s)", n, generate_s)
    files, scores = assemble_outputs(out, state, names, cfg.ipc, spec.latent_shape, timings)
    return Generated(files, scores, Resumed(len(names), len(done)), timings)


def assemble_outputs(
    out: OutputDir,
    state: RunState,
    names: dict[int, str],
    ipc: int,
    latent_shape: tuple[int, int, int],
    timings: Timings,
) -> tuple[list[str], dict[int, float]]:
    """distilled.parquet, latents.safetensors and grid.png from every class's state file (`outputs.assemble`), timed."""
    t = time.perf_counter()
    files, scores = assemble(out, state, names, ipc, latent_shape)
    timings.add("assemble outputs", len(names) * ipc, time.perf_counter() - t)
    return files, scores
