"""Ray Data adapters around the core stages: each class loads its model once per actor.

Nothing here re-implements the method; it batches rows into tensors, calls `d3hr_ray.stages`, and
turns the results into rows. Partial statistics travel as safetensors bytes (one row per batch).
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch

from d3hr_ray.data.preprocess import convert_batch, to_model_input
from d3hr_ray.seeding import derive_seed, generator
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.encode import decode, encode
from d3hr_ray.stages.generate import sample
from d3hr_ray.stages.invert import invert
from d3hr_ray.stages.select import select_group
from d3hr_ray.stages.stats import ClassStats

__all__ = ["EncodeInvertStats", "GenerateClasses", "Partial", "merge_partials", "preprocess_batch"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preprocess_batch(batch: dict, *, resolution: int) -> dict:
    """CPU task: {item, label, key} -> {image (N, 3, R, R) float32 in [-1, 1], label, key, reason}.

    A row that cannot be used keeps its label and key, gets a zero image and a non-empty reason.
    """
    labels = np.asarray(batch["label"], dtype=np.int64)
    images, reasons = convert_batch(batch["item"], labels, lambda it: to_model_input(it, resolution),
                                    (3, resolution, resolution), np.float32, unlabelled="not in a class of --data")
    return {"image": images, "label": labels, "key": np.asarray(batch["key"], dtype=object), "reason": reasons}


class Partial:
    """Per-batch partial result: sparse class statistics + read/skip counts + the skipped inputs."""

    @staticmethod
    def pack(stats: ClassStats, read: np.ndarray, skipped: list[list]) -> dict:
        from safetensors.torch import save

        state = stats.to_partial()
        state["read"] = torch.from_numpy(np.ascontiguousarray(read, dtype=np.int64))
        return {"partial": np.array([save(state)], dtype=object), "skipped": np.array([json.dumps(skipped)], dtype=object)}

    @staticmethod
    def unpack(blob: bytes) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(bytes(blob))


def _torch_threads(num_cpus: float) -> None:
    torch.set_num_threads(max(1, int(num_cpus)))


class EncodeInvertStats:
    """Actor: D3HR stages 1-3 on a batch. Loads the pipeline once; emits one partial-statistics row per batch.

    Args (constructor): model source, device, dtype name, encode mode, seed, steps, inversion step,
        guidance, CPU threads for torch.
    """

    def __init__(self, *, model: str, device: str, dtype: str, mode: str, seed: int, steps: int, inversion_step: int, guidance: float, threads: float):
        from d3hr_ray.models.loading import load_pipeline

        _torch_threads(threads)
        self.device = device
        self.pipe = load_pipeline(model, device=device, dtype=_DTYPES[dtype])
        self.spec = ModelSpec.from_pipeline(self.pipe)
        self.mode, self.seed, self.steps, self.k, self.w = mode, seed, steps, inversion_step, guidance

    def __call__(self, batch: dict) -> dict:
        labels = np.asarray(batch["label"], dtype=np.int64)
        reasons = batch["reason"]
        ok = np.array([not r for r in reasons], dtype=bool)
        c, d = self.spec.num_classes, self.spec.latent_dim
        read = np.bincount(labels[labels >= 0], minlength=c)[:c]
        skipped = [[str(k), int(y), str(r)] for k, y, r in zip(batch["key"], labels, reasons) if r]
        stats = ClassStats(c, d)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(self.device)  # (B, 3, R, R)
            y = torch.from_numpy(labels[ok]).to(self.device)  # (B,)
            gens = None
            if self.mode == "sample":
                # Noise keyed by (seed, image key): an image's latent never depends on its batch or worker.
                gens = [generator(self.seed, "encode", str(k), device=self.device) for k in batch["key"][ok]]
            z0 = encode(self.pipe, x, mode=self.mode, generator=gens)  # (B, c, h, w)
            zk = invert(self.pipe, z0, y, steps=self.steps, inversion_step=self.k, guidance=self.w)
            stats.update(zk.flatten(1), y)
        return Partial.pack(stats, read, skipped)


def merge_partials(batch: dict, *, num_classes: int, dim: int) -> dict:
    """CPU task: many partial rows -> one (a level of tree reduction, so the driver sees few rows)."""
    stats = ClassStats(num_classes, dim)
    read = np.zeros(num_classes, dtype=np.int64)
    skipped: list = []
    for blob, sk in zip(batch["partial"], batch["skipped"]):
        part = Partial.unpack(blob)
        read += part.pop("read").numpy()
        stats.merge_partial(part)
        skipped.extend(json.loads(sk))
    return Partial.pack(stats, read, skipped)


def _png(img: np.ndarray, size: int) -> bytes:
    """(3, H, W) float in [0, 1] -> PNG bytes, resized to size x size with Lanczos (as the reference saves)."""
    from PIL import Image

    arr = (img.transpose(1, 2, 0) * 255.0).round().clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


class GenerateClasses:
    """Actor: D3HR stages 4-5 for whole classes. Any actor may do any class: seeds are (seed, class id).

    Emits one row per distilled image: label, index k, PNG bytes, the selected latent z_K, timings.
    """

    def __init__(self, *, model: str, device: str, dtype: str, stats_ref: list, ipc: int, candidates: int, seed: int,
                 weights: tuple, latents: str, steps: int, start_step: int, guidance: float, output_size: int, threads: float):
        import ray

        from d3hr_ray.models.loading import load_pipeline

        _torch_threads(threads)
        self.device = device
        self.pipe = load_pipeline(model, device=device, dtype=_DTYPES[dtype])
        self.spec = ModelSpec.from_pipeline(self.pipe)
        mean, var = ray.get(stats_ref[0])  # (C, D) float32 each: the values written to stats.safetensors
        self.mean, self.std = torch.from_numpy(np.array(mean)), torch.from_numpy(np.array(var)).sqrt()
        self.ipc, self.m, self.seed, self.weights, self.latents = ipc, candidates, seed, tuple(weights), latents
        self.steps, self.start, self.w, self.size = steps, start_step, guidance, output_size

    def __call__(self, batch: dict) -> dict:
        rows = {"label": [], "k": [], "png": [], "latent": [], "score": [], "select_s": [], "generate_s": []}
        for c in np.asarray(batch["label"], dtype=np.int64):
            t0 = time.perf_counter()
            if self.latents == "noise":  # the ablation: z_K ~ N(0, I), no class statistics
                d = self.mean.shape[1]
                group = torch.randn((self.ipc, d), generator=generator(self.seed, "noise-latents", int(c)))  # (ipc, D)
                score = float("nan")
            else:
                group, score = select_group(
                    self.mean[c].to(self.device), self.std[c].to(self.device), ipc=self.ipc, candidates=self.m,
                    seed=derive_seed(self.seed, "select", int(c)), weights=self.weights,
                )  # (ipc, D)
            t1 = time.perf_counter()
            zk = group.to(torch.float32).view(self.ipc, *self.spec.latent_shape)  # (ipc, c, h, w)
            labels = torch.full((self.ipc,), int(c), device=self.device)
            images = decode(self.pipe, sample(self.pipe, zk, labels, steps=self.steps, start_step=self.start, guidance=self.w))
            images = images.float().cpu().numpy()  # (ipc, 3, R, R) in [0, 1]
            t2 = time.perf_counter()
            for k in range(self.ipc):
                rows["label"].append(int(c))
                rows["k"].append(k)
                rows["png"].append(_png(images[k], self.size))
                rows["latent"].append(zk[k].flatten().cpu().numpy())
                rows["score"].append(score)
                rows["select_s"].append((t1 - t0) / self.ipc)
                rows["generate_s"].append((t2 - t1) / self.ipc)
        return {
            "label": np.array(rows["label"], dtype=np.int64),
            "k": np.array(rows["k"], dtype=np.int64),
            "png": np.array(rows["png"], dtype=object),
            "latent": np.stack(rows["latent"]).astype(np.float32),
            "score": np.array(rows["score"], dtype=np.float64),
            "select_s": np.array(rows["select_s"]),
            "generate_s": np.array(rows["generate_s"]),
        }
