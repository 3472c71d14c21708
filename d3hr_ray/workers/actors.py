"""Ray Data adapters around the core stages: each class loads its model once per actor.

Nothing here re-implements the method; it batches rows into tensors, calls `d3hr_ray.stages`, and
turns the results into rows. No Ray import at module level: these are plain callables that the job
hands to `map_batches`.

    sources.read_batches (CPU task, torch-free; one shard a call) -> rows, one per fixed sub-batch of a shard:
        {shard, part, parts, pixels: uint8 bytes (n, 3, R, R), meta: JSON (labels, keys, read, skipped)}
    EncodeInvertStats (model actor, one row a call) -> {shard, part, parts, partial: safetensors bytes, meta
                                                        [, latents: float16 bytes (n, D) with --keep-latents]}
    GenerateClasses (model actor, one class a call) -> one row per distilled image

A shard's sub-batches are cut at fixed positions (every `batch_size` inputs of the shard), so the
images batched together never depend on Ray's block boundaries, worker count or timing: a shard's
partial statistics come out bit-identical on every run on the same hardware.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load, save

from d3hr_ray.seeding import derive_seed, generator
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.encode import decode, encode
from d3hr_ray.stages.generate import sample
from d3hr_ray.stages.invert import invert
from d3hr_ray.stages.select import noise_latents, select_group
from d3hr_ray.stages.stats import batch_partial

__all__ = [
    "CPU_BATCH",
    "GPU_BATCH",
    "EncodeInvertStats",
    "EncodeSpec",
    "GenerateClasses",
    "GenerateSpec",
    "default_batch_size",
    "gpu_chunk_size",
    "pack_partial",
    "unpack_partial",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Encode+invert sub-batch when --batch-size is not given. On CPUs, as before. On GPUs, a sub-batch of
# GPU_BATCH that the actor runs in chunks sized to its free memory (`gpu_chunk_size`). On an H200,
# images/s was flat from 64 to 256 (docs/performance.md, "GPU"): 256 is the largest size measured.
CPU_BATCH = 64
GPU_BATCH = 256
# Planned peak bytes of encode+invert per image, per channel of the VAE's first block and per pixel: twice
# what an H200 measured (docs/performance.md, "GPU": the VAE encoder's full-resolution blocks dominate).
_PEAK_BYTES_PER_CHANNEL_PIXEL = 24
# Share of the free memory (after the model is loaded) that a chunk may plan to use.
_MEMORY_SHARE = 0.5


def default_batch_size(device: str) -> int:
    """Encode+invert sub-batch for a device type when --batch-size is not given."""
    return GPU_BATCH if device == "cuda" else CPU_BATCH


def gpu_chunk_size(free_bytes: int, vae_channels: int, resolution: int, cap: int = GPU_BATCH) -> int:
    """Images an actor encodes+inverts at once: the largest power of two <= cap whose planned peak,
    `_PEAK_BYTES_PER_CHANNEL_PIXEL * vae_channels * resolution^2` bytes per image, fits in
    `_MEMORY_SHARE` of free_bytes (at least 1).

    Args:
        free_bytes: the GPU's free memory after loading the model (torch.cuda.mem_get_info()[0]).
        vae_channels: the VAE's first block width (block_out_channels[0], 128 for SD's VAE).
        resolution: R, the image side.
    """
    per_image = _PEAK_BYTES_PER_CHANNEL_PIXEL * vae_channels * resolution**2
    fits = max(1, int(_MEMORY_SHARE * free_bytes // per_image))
    return min(cap, 2 ** (fits.bit_length() - 1))


def pack_partial(partial: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in partial.items()})


def unpack_partial(blob: bytes) -> dict[str, torch.Tensor]:
    return load(bytes(blob))


def _torch_threads(num_cpus: float) -> None:
    torch.set_num_threads(max(1, int(num_cpus)))


@dataclass(frozen=True)
class EncodeSpec:
    """What an encode+invert actor needs: model source, device, dtype name, encode mode, seed, N, K, w, threads."""

    model: str
    device: str
    dtype: str
    mode: str
    seed: int
    steps: int
    inversion_step: int
    guidance: float
    threads: float
    chunk: bool = False  # GPU: run each sub-batch in chunks that fit the free memory (gpu_chunk_size)
    compile: bool = False  # torch.compile the DiT
    keep_latents: bool = False  # also emit each sub-batch's z_K (float16), for --candidates-from real


def _load(model: str, device: str, dtype: str) -> Any:
    """The actor's DiTPipeline. diffusers is imported here, in the actor, not with this module: the job's driver
    imports the actor classes to hand them to `map_batches` and never loads a model (docs/performance.md)."""
    from d3hr_ray.models.loading import load_pipeline

    return load_pipeline(model, device=device, dtype=_DTYPES[dtype])


def _compile(pipe: Any, on: bool) -> None:
    if on:
        # In place (the module stays a DiTTransformer2DModel); shapes that change recompile, then go dynamic.
        pipe.transformer.compile()


class EncodeInvertStats:
    """Actor: D3HR stages 1-3 on a sub-batch. Loads the pipeline once; emits its sparse partial statistics."""

    def __init__(self, spec: EncodeSpec):
        _torch_threads(spec.threads)
        self.cfg = spec
        self.pipe = _load(spec.model, spec.device, spec.dtype)
        self.spec = ModelSpec.from_pipeline(self.pipe)
        _compile(self.pipe, spec.compile)
        self.chunk = None  # None: a whole sub-batch at once
        if spec.chunk and torch.device(spec.device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(spec.device))
            self.chunk = gpu_chunk_size(free, self.pipe.vae.config.block_out_channels[0], self.spec.resolution)

    def _latents(self, x: torch.Tensor, y: torch.Tensor, gens: Sequence[torch.Generator] | None) -> torch.Tensor:
        """Stages 1-2 on (B, 3, R, R) images: z_K (B, c, h, w), in chunks of self.chunk images if set."""
        cfg = self.cfg
        step = self.chunk or len(x)
        out = []
        for a in range(0, len(x), step):
            g = gens[a : a + step] if gens else None
            z0 = encode(self.pipe, x[a : a + step], mode=cfg.mode, generator=g)  # (b, c, h, w), b <= step
            out.append(
                invert(
                    self.pipe,
                    z0,
                    y[a : a + step],
                    steps=cfg.steps,
                    inversion_step=cfg.inversion_step,
                    guidance=cfg.guidance,
                )
            )
        return torch.cat(out)

    def __call__(self, batch: dict) -> dict:
        cfg, r = self.cfg, self.spec.resolution
        partials, kept = [], []
        for blob, text in zip(batch["pixels"], batch["meta"], strict=True):
            meta = json.loads(text)
            zk = torch.zeros(0, self.spec.latent_dim)
            partial = batch_partial(zk, torch.zeros(0, dtype=torch.int64), self.spec.num_classes)
            if meta["labels"]:
                pixels = np.frombuffer(bytes(blob), dtype=np.uint8).reshape(-1, 3, r, r)  # (B, 3, R, R)
                x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).to(cfg.device)  # stage 1: [-1, 1]
                y = torch.tensor(meta["labels"], dtype=torch.int64, device=cfg.device)  # (B,)
                gens = None
                if cfg.mode == "sample":
                    # Noise keyed by (seed, image key): an image's latent never depends on its batch or worker.
                    gens = [generator(cfg.seed, "encode", str(k), device=cfg.device) for k in meta["keys"]]
                zk = self._latents(x, y, gens).flatten(1)  # (B, D)
                partial = batch_partial(zk, y, self.spec.num_classes)  # the classes present only: O(k x D)
            partials.append(pack_partial(partial))
            kept.append(zk.to(torch.float16).cpu().numpy().tobytes())
        out = {k: batch[k] for k in ("shard", "part", "parts", "meta")}
        out["partial"] = np.array(partials, dtype=object)
        if cfg.keep_latents:
            out["latents"] = np.array(kept, dtype=object)
        return out


def _png(img: np.ndarray, size: int) -> bytes:
    """(3, H, W) float in [0, 1] -> PNG bytes, resized to size x size with Lanczos (as the reference saves)."""
    arr = (img.transpose(1, 2, 0) * 255.0).round().clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class GenerateSpec:
    """What a generation actor needs: model, device, dtype, IPC, m, seed, score weights, latent source, N, start,
    w, output size."""

    model: str
    device: str
    dtype: str
    ipc: int
    candidates: int
    seed: int
    weights: tuple[float, ...]
    latents: str
    steps: int
    start_step: int
    guidance: float
    output_size: int
    threads: float
    compile: bool = False  # torch.compile the DiT
    chunk: bool = False  # GPU: sample and decode a call's images in chunks that fit the free memory


class GenerateClasses:
    """Actor: D3HR stages 4-5 for a group of whole classes a call. Any actor may do any group: seeds are
    (seed, class id).

    Selection is per class. On a GPU the group's latents are sampled and decoded together (in chunks that
    fit the free memory), which is what keeps a call near the batch-200 rate; the images then depend on
    the group's composition at float precision, which is why groups are fixed by class id
    (`generation.class_groups`). On a CPU each class is sampled and decoded alone, so its images are the
    same bytes in any group.

    Emits one row per distilled image: label, index k, PNG bytes, the selected latent z_K, timings.
    """

    def __init__(self, spec: GenerateSpec, stats_ref: list):
        import ray

        _torch_threads(spec.threads)
        self.cfg = spec
        self.pipe = _load(spec.model, spec.device, spec.dtype)
        self.spec = ModelSpec.from_pipeline(self.pipe)
        _compile(self.pipe, spec.compile)
        self.batched = torch.device(spec.device).type != "cpu"
        self.chunk = None  # None: a whole group at once
        if spec.chunk and torch.device(spec.device).type == "cuda":
            # Decoding dominates the peak; encode+invert's per-image plan is about 1.5x what generation measured.
            free, _ = torch.cuda.mem_get_info(torch.device(spec.device))
            self.chunk = gpu_chunk_size(free, self.pipe.vae.config.block_out_channels[0], self.spec.resolution)
        mean, var = ray.get(stats_ref[0])  # (C, D) float32 each: the values written to stats.safetensors
        self.mean, self.std = torch.from_numpy(np.array(mean)), torch.from_numpy(np.array(var)).sqrt()

    def _latents(self, c: int) -> tuple[torch.Tensor, float]:
        """(IPC, D) float32 starting latents z_K of class c and their group score."""
        cfg = self.cfg
        if cfg.latents == "noise":  # the ablation: z_K ~ N(0, I), no class statistics
            return noise_latents(cfg.ipc, self.spec.latent_dim, seed=cfg.seed, class_id=c), float("nan")
        return select_group(
            self.mean[c].to(cfg.device),
            self.std[c].to(cfg.device),
            ipc=cfg.ipc,
            candidates=cfg.candidates,
            seed=derive_seed(cfg.seed, "select", c),
            weights=cfg.weights,
        )

    def _images(self, zk: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Stage 5 on (B, c, h, w) latents: (B, 3, R, R) float32 images in [0, 1], in chunks of self.chunk if set."""
        cfg, step = self.cfg, self.chunk or len(zk)
        out = []
        for a in range(0, len(zk), step):
            z0 = sample(
                self.pipe,
                zk[a : a + step],
                labels[a : a + step],
                steps=cfg.steps,
                start_step=cfg.start_step,
                guidance=cfg.guidance,
            )
            out.append(decode(self.pipe, z0).float().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, batch: dict) -> dict:
        """batch["classes"]: one group of class ids (a row per call). Rows out: one per image, class by class."""
        cfg = self.cfg
        classes = [int(c) for c in np.asarray(batch["classes"][0]).tolist()]
        latents, scores, select_s = [], [], []
        for c in classes:
            t0 = time.perf_counter()
            group, score = self._latents(c)  # (ipc, D)
            select_s.append(time.perf_counter() - t0)
            latents.append(group.to(torch.float32).view(cfg.ipc, *self.spec.latent_shape))  # (ipc, c, h, w)
            scores.append(score)
        t1 = time.perf_counter()
        if self.batched:  # the whole group in one pass (chunked by memory)
            zk = torch.cat([z.to(cfg.device) for z in latents])  # (G * ipc, c, h, w)
            labels = torch.tensor(classes, device=cfg.device).repeat_interleave(cfg.ipc)
            images = self._images(zk, labels)
        else:  # class by class: a class's images never depend on its group
            images = np.concatenate(
                [
                    self._images(z.to(cfg.device), torch.full((cfg.ipc,), c, device=cfg.device))
                    for c, z in zip(classes, latents, strict=True)
                ]
            )
        generate_s = (time.perf_counter() - t1) / len(images)
        rows: dict[str, list[Any]] = {
            "label": [],
            "k": [],
            "png": [],
            "latent": [],
            "score": [],
            "select_s": [],
            "generate_s": [],
        }
        for g, c in enumerate(classes):
            for k in range(cfg.ipc):
                rows["label"].append(c)
                rows["k"].append(k)
                rows["png"].append(_png(images[g * cfg.ipc + k], cfg.output_size))
                rows["latent"].append(latents[g][k].flatten().cpu().numpy())
                rows["score"].append(scores[g])
                rows["select_s"].append(select_s[g] / cfg.ipc)
                rows["generate_s"].append(generate_s)
        return {
            "label": np.array(rows["label"], dtype=np.int64),
            "k": np.array(rows["k"], dtype=np.int64),
            "png": np.array(rows["png"], dtype=object),
            "latent": np.stack(rows["latent"]).astype(np.float32),
            "score": np.array(rows["score"], dtype=np.float64),
            "select_s": np.array(rows["select_s"]),
            "generate_s": np.array(rows["generate_s"]),
        }
