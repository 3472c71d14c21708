"""GPU throughput of D3HR on a DiT-XL/2-shaped random model at 256 px, as fractions of the card's limit.

One run measures, in priority order, writing its JSON after every row (a run cut short keeps what it did):

    peak        the card's bf16 matrix-product rate (n x n x n), the denominator of every MFU
    encode      encode+invert (K = 30, CFG w = 4) images/s at several batch sizes, bf16 and fp16, eager
    select      select_group on the device (D = 4096, IPC 10 and 50, m = 10^5) vs the straightforward loop
                (since issue #24: the bounds and the running best stay on the device)
    generate    DDIM sampling from tau_K + decode: one image at a time vs batched
    groups      generation as the job calls it at IPC 10 and 50: one class a call vs groups of classes
    paper       the paper-style loop: fp16, the reference's batch of 200 and its 38 inversion passes;
                generation in fp16 one image at a time
    ray         the same encode+invert through `python -m d3hr_ray.distill --stats-only` on this GPU, with
                --compile auto (a short run: the row names the mode it chose and why)
    compile     encode+invert with the transformer under torch.compile (bf16)
    ray_compile the job again with --compile on (only when named in --sections)

Every measurement calls the product's stage functions (encode, invert, sample, decode, select_group)
on a pipeline from `build_pipeline` (random weights, the published shapes: no download).

FLOPs (MFU = achieved model FLOP/s / measured peak): one DiT forward, one VAE encode and one VAE decode per
image, counted by `steps.plan.model_flops` as the dry-run plan counts them (torch's FlopCounterMode on the
meta device: matrix products, convolutions and attention, 2 FLOPs a multiply-add). DiT-XL/2 at 256 px:
237.3 GFLOP (118.7 G multiply-adds) per image, as D3HR.md quotes; tests/benchmarks/test_gpu.py checks the
count against a closed formula. Encode+invert costs vae_encode + K * 2 * forward per image (CFG doubles the
batch); generation K * 2 * forward + vae_decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from benchmarks.selection import straightforward_select
from d3hr_ray.config import DistillConfig
from d3hr_ray.distill import run as run_job
from d3hr_ray.models.build import build_pipeline
from d3hr_ray.models.loading import class_names
from d3hr_ray.seeding import generator
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.encode import decode, encode
from d3hr_ray.stages.generate import sample
from d3hr_ray.stages.invert import invert
from d3hr_ray.stages.select import BLOCK, group_score, select_group
from d3hr_ray.steps.generation import class_groups, classes_per_call
from d3hr_ray.steps.plan import model_flops
from d3hr_ray.workers.resources import compile_choice

# Registry: shape name -> what the bench builds and how much work each section does.
SHAPES = {
    "xl": dict(
        dit="XL/2",
        vae="sd",
        resolution=256,
        num_classes=1000,
        encode_batches=(32, 64, 128, 256),
        dtypes=("bfloat16", "float16"),
        gen_batches=(10, 50, 200),
        group_ipcs=(10, 50),
        group_images=200,
        one_at_a_time=8,
        select_dim=4096,
        candidates=100_000,
        baseline_candidates=10_000,
        paper_batch=200,
        ray_images=512,
        ray_batch=256,
        compile_batches=(256,),
        matmul=8192,
    ),
    "tiny": dict(
        dit="tiny",
        vae="tiny",
        resolution=8,
        num_classes=10,
        encode_batches=(4, 8),
        dtypes=("bfloat16", "float16"),
        gen_batches=(4,),
        group_ipcs=(2,),
        group_images=6,
        one_at_a_time=2,
        select_dim=64,
        candidates=2_000,
        baseline_candidates=1_000,
        paper_batch=4,
        ray_images=16,
        ray_batch=4,
        compile_batches=(8,),
        matmul=256,
    ),
}
SECTIONS = ("peak", "encode", "select", "generate", "groups", "paper", "ray", "compile", "ray_compile")
# What a plain run measures; ray_compile (the job with --compile) is asked for by name.
DEFAULT_SECTIONS = SECTIONS[:-1]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The reference's inversion: fp16, DataLoader batches of 200, DiT passes at i = 1..38 of 50.
_PAPER_INVERSION_PASSES = 38
# Seconds a section may assume for what it cannot estimate from FLOPs (warm-ups, allocation, start-up).
_SECTION_OVERHEAD_S = {"ray": 45.0, "compile": 100.0}


@dataclass
class Budget:
    """Wall-clock budget of the whole run: a section starts only if its estimate fits."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, seconds: float) -> bool:
        return self.left() > seconds


class Results:
    """Rows and facts of the run, written as JSON after every change."""

    def __init__(self, path: Path, info: dict):
        self.path, self.data = path, {"info": info, "rows": [], "skipped": [], "notes": []}
        self.save()

    def add(self, **row) -> dict:
        self.data["rows"].append(row)
        self.save()
        tf = f"{row['tflops']:.1f}" if row.get("tflops") is not None else ""
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        print(
            f"  {row['section']:<9} {row['config']:<44} {row['items']:>8} items {row['seconds']:>8.2f} s "
            f"{row['per_s']:>12.1f}/s {tf:>7} TFLOP/s {mfu:>6} {row.get('note', '')}",
            flush=True,
        )
        return row

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        self.save()
        print(f"  skipped {what}: {why}", flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


class Bench:
    """The model, the device, the FLOP counts and the timer shared by the sections."""

    def __init__(self, args: argparse.Namespace, shape: dict, res: Results, budget: Budget):
        self.args, self.shape, self.res, self.budget = args, shape, res, budget
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        t = time.perf_counter()
        with torch.device(self.device):  # parameters are created (and initialised) on the device
            self.pipe = build_pipeline(
                dit=shape["dit"],
                vae=shape["vae"],
                resolution=shape["resolution"],
                num_classes=shape["num_classes"],
                seed=0,
            )
        self.spec = ModelSpec.from_pipeline(self.pipe)
        self.dtype: str | None = None
        self.set_dtype("bfloat16")
        # FLOPs per image, counted as the dry-run plan counts them (on the meta device, from the configs).
        flops = model_flops(dict(self.pipe.transformer.config), dict(self.pipe.vae.config))
        self.fwd, self.vae_enc, self.vae_dec = flops["dit"], flops["encode"], flops["decode"]
        self.peak: float | None = None
        procs = sorted({type(m.processor).__name__ for m in self.pipe.transformer.modules() if hasattr(m, "processor")})
        res.data["info"].update(
            model={
                "dit": shape["dit"],
                "vae": shape["vae"],
                "resolution": self.spec.resolution,
                "latent_shape": list(self.spec.latent_shape),
                "num_classes": self.spec.num_classes,
                "dit_params": sum(p.numel() for p in self.pipe.transformer.parameters()),
                "vae_params": sum(p.numel() for p in self.pipe.vae.parameters()),
                "build_s": round(time.perf_counter() - t, 2),
            },
            flops={
                "dit_forward_counted": self.fwd,
                "vae_encode_counted": self.vae_enc,
                "vae_decode_counted": self.vae_dec,
            },
            attention_processors=procs,
        )
        res.save()
        print(
            f"# model built in {time.perf_counter() - t:.1f} s: DiT forward {self.fwd / 1e9:.2f} GFLOP/image, VAE "
            f"encode {self.vae_enc / 1e9:.2f}, decode {self.vae_dec / 1e9:.2f} GFLOP (counted); "
            f"attention: {', '.join(procs)}",
            flush=True,
        )

    def set_dtype(self, name: str) -> None:
        if self.dtype != name:
            self.pipe.to(dtype=_DTYPES[name])
            self.dtype = name

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, fn()) with the device synchronised on both sides."""
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t, out

    def images(self, n: int, seed: int = 0) -> torch.Tensor:
        """(n, 3, R, R) float32 in [-1, 1] on the device."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        r = self.spec.resolution
        return torch.rand(n, 3, r, r, generator=g, device=self.device) * 2 - 1

    def labels(self, n: int, seed: int = 0) -> torch.Tensor:
        """(n,) int64 class ids on the device."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randint(0, self.spec.num_classes, (n,), generator=g, device=self.device)

    def estimate_s(self, flops: float) -> float:
        """A cautious time for `flops` of model work: at 30% of the peak, plus a second."""
        return flops / (0.3 * (self.peak or 1e12)) + 1.0

    def rate(self, flops_per_item: float, items: int, seconds: float) -> tuple[float | None, float | None]:
        """(TFLOP/s, MFU) of `items` items of `flops_per_item` each done in `seconds`."""
        if not flops_per_item:
            return None, None
        achieved = flops_per_item * items / seconds
        return achieved / 1e12, (achieved / self.peak if self.peak else None)

    def fits(self, what: str, est_s: float) -> bool:
        """Whether `what` (about est_s seconds) fits the budget; if not, it is recorded as skipped."""
        if self.budget.fits(est_s):
            return True
        self.res.skip(what, f"needs ~{est_s:.0f} s, {self.budget.left():.0f} s left")
        return False

    def record(
        self, section: str, config: str, items: int, seconds: float, flops_per_item: float = 0.0, **fields: Any
    ) -> dict:
        """One row: `items` items done in `seconds`, their rate, TFLOP/s and MFU (none when flops_per_item is 0),
        then `fields`."""
        tf, mfu = self.rate(flops_per_item, items, seconds)
        return self.res.add(
            section=section,
            config=config,
            items=items,
            seconds=seconds,
            per_s=items / seconds,
            tflops=tf,
            mfu=mfu,
            **fields,
        )

    def measure(
        self,
        section: str,
        config: str,
        est_s: float,
        warmup: Callable[[], Any],
        work: Callable[[], Any],
        *,
        items: int,
        flops_per_item: float,
        **fields: Any,
    ) -> dict | None:
        """Time `warmup()`, then `work()` (`items` items of `flops_per_item` each), and record the row with the
        warm-up's seconds and the device's memory; None, recorded as skipped, when it would not fit the budget
        (`est_s`) or the device runs out of memory."""
        what = f"{section} {config}"
        if not self.fits(what, est_s):
            return None
        self.reset_memory()
        try:
            warm, _ = self.timed(warmup)
            secs, _ = self.timed(work)
        except torch.OutOfMemoryError:
            self.res.skip(what, "out of memory")
            self.reset_memory()
            return None
        return self.record(section, config, items, secs, flops_per_item, **fields, warmup_s=warm, **self.memory())

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2),
            "free_gib": round(free / 2**30, 1),
            "total_gib": round(total / 2**30, 1),
        }

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


# -- sections ---------------------------------------------------------------------------------------


def measure_peak(
    device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16, repeats: int = 50, warmups: int = 20
) -> float:
    """The measured matrix-product rate (FLOP/s) of an n x n x n product on random data: the mean of
    `repeats` products after `warmups` (which also bring the clocks up)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    for _ in range(warmups):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def _encode_invert(b: Bench, x: torch.Tensor, y: torch.Tensor, k: int, keys_seed: int = 0) -> torch.Tensor:
    """The model actor's work on one sub-batch: encode (posterior sample, one generator per image) + invert."""
    gens = [generator(keys_seed, "encode", str(i), device=b.device) for i in range(len(x))]
    z0 = encode(b.pipe, x, mode="sample", generator=gens)  # (B, c, h, w)
    return invert(b.pipe, z0, y, steps=b.args.steps, inversion_step=k, guidance=b.args.guidance)


def section_encode(
    b: Bench,
    dtypes: Sequence[str],
    batches: Sequence[int],
    *,
    label: str = "eager",
    passes: int | None = None,
    section: str = "encode",
) -> list[dict]:
    """Encode+invert images/s per (dtype, batch): a warm-up with one inversion step, then one timed run of K."""
    k = passes or b.args.inversion_step
    rows = []
    per_image = b.vae_enc + k * 2 * b.fwd
    for dt in dtypes:
        b.set_dtype(dt)
        for n in batches:
            x, y = b.images(n), b.labels(n)
            row = b.measure(
                section,
                f"{dt} B={n} K={k} {label}",
                b.estimate_s(per_image * n * (1 + 1 / k)),
                lambda x=x, y=y: _encode_invert(b, x, y, 1),
                lambda x=x, y=y, k=k: _encode_invert(b, x, y, k),
                items=n,
                flops_per_item=per_image,
                dtype=dt,
                batch=n,
                steps=k,
                compiled=label != "eager",
            )
            rows += [row] if row else []
            del x, y
    return rows


def _sample_decode(b: Bench, z: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
    """Stage 5 as the job runs it: (B, c, h, w) latents at tau_start, (B,) labels -> (B, 3, R, R) images."""
    return decode(b.pipe, sample(b.pipe, z, y, steps=b.args.steps, start_step=start, guidance=b.args.guidance))


def section_generate(
    b: Bench, dtype: str, batches: Sequence[int], one_at_a_time: int, *, section: str = "generate"
) -> list[dict]:
    """D3HR stage 5 (sample from tau_K + decode): batched vs one image at a time."""
    b.set_dtype(dtype)
    k = b.args.inversion_step
    per_image = k * 2 * b.fwd + b.vae_dec
    rows = []
    runs = [(1, one_at_a_time)] + [(n, n) for n in batches]
    for n, total in runs:
        g = torch.Generator(device=b.device).manual_seed(1)
        z = torch.randn(total, *b.spec.latent_shape, generator=g, device=b.device)  # (total, c, h, w) z_K
        y = b.labels(total, seed=1)
        row = b.measure(
            section,
            f"{dtype} " + ("one image at a time" if n == 1 else f"batch {n}"),
            b.estimate_s(per_image * total) + (0.05 * k * total if n == 1 else 0),
            lambda z=z, y=y, n=n: _sample_decode(b, z[:n], y[:n], 1),
            lambda z=z, y=y, n=n, total=total: [
                _sample_decode(b, z[i : i + n], y[i : i + n], k) for i in range(0, total, n)
            ],
            items=total,
            flops_per_item=per_image,
            dtype=dtype,
            batch=n,
            steps=k,
        )
        rows += [row] if row else []
    return rows


def section_groups(b: Bench, dtype: str, ipcs: Sequence[int], images: int) -> list[dict]:
    """Generation as the job runs it: one class a call (batch = IPC) against groups of whole classes a call
    (`generation.classes_per_call` on this device: 200 images a call on a GPU), `images` // IPC classes at each IPC."""
    b.set_dtype(dtype)
    k = b.args.inversion_step
    per_image = k * 2 * b.fwd + b.vae_dec
    rows = []
    for ipc in ipcs:
        per_call = classes_per_call(None, b.device.type, ipc)
        if b.device.type != "cuda":
            per_call = max(2, per_call)  # on a CPU the job takes one class a call; the bench still times a group
        n_classes = max(1, images // ipc)
        total = n_classes * ipc
        g = torch.Generator(device=b.device).manual_seed(2)
        z = torch.randn(total, *b.spec.latent_shape, generator=g, device=b.device)  # (total, c, h, w)
        y = torch.arange(n_classes, device=b.device).repeat_interleave(ipc)  # class c's images at c*ipc..
        for classes_a_call in (1, per_call):
            calls = [(grp[0] * ipc, (grp[-1] + 1) * ipc) for grp in class_groups(range(n_classes), classes_a_call)]
            a, e = calls[0]
            row = b.measure(
                "groups",
                f"{dtype} IPC {ipc}, {classes_a_call} class(es) a call ({classes_a_call * ipc} images)",
                2 * b.estimate_s(per_image * total),
                lambda a=a, e=e, z=z, y=y: _sample_decode(b, z[a:e], y[a:e], 1),
                lambda calls=calls, z=z, y=y: [_sample_decode(b, z[a:e], y[a:e], k) for a, e in calls],
                items=total,
                flops_per_item=per_image,
                dtype=dtype,
                ipc=ipc,
                batch=classes_a_call * ipc,
            )
            rows += [row] if row else []
    return rows


def section_select(b: Bench, ipcs: Sequence[int] = (10, 50)) -> list[dict]:
    """select_group on the bench's device vs the straightforward loop (benchmarks selection) on the same device."""
    d, m, m0 = b.shape["select_dim"], b.shape["candidates"], b.shape["baseline_candidates"]
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(d, generator=g).to(b.device)
    std = (torch.rand(d, generator=g) + 0.5).to(b.device)
    select_group(mean, std, ipc=10, candidates=BLOCK, seed=0)  # warm-ups: generators, kernels
    straightforward_select(mean, std, ipc=10, candidates=1000, seed=0)
    rows = []
    for ipc in ipcs:
        if not b.fits(f"select IPC {ipc}", 20):
            continue
        t0, (g0, s0) = b.timed(lambda ipc=ipc: straightforward_select(mean, std, ipc=ipc, candidates=m0, seed=1))
        t1, (g1, s1) = b.timed(lambda ipc=ipc: select_group(mean, std, ipc=ipc, candidates=m, seed=1))
        for grp, s in ((g0, s0), (g1, s1)):  # both minimise the same score: recompute each winner's from scratch
            check = group_score(grp.double().cpu(), mean.double().cpu(), std.double().cpu()).item()
            assert abs(check - s) <= 1e-4 * abs(check), (check, s)
        r0 = b.record("select", f"straightforward loop IPC {ipc} D={d}", m0, t0, ipc=ipc, score=s0)
        r1 = b.record(
            "select",
            f"select_group IPC {ipc} D={d}",
            m,
            t1,
            ipc=ipc,
            score=s1,
            note=f"{(m / t1) / (m0 / t0):.1f}x the loop",
        )
        rows += [r0, r1]
    return rows


def _write_images(root: Path, n: int, classes: list[str], side: int) -> None:
    """n random JPEGs of side x side in an ImageFolder layout (class folders named as the model's classes)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth random images (noise upsampled): JPEG sizes like photographs', not like white noise.
        small = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side + 8, side + 8), Image.Resampling.BILINEAR)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def section_ray(b: Bench, n: int, batch: int, dtype: str, in_process: dict | None, compile: str = "auto") -> list[dict]:
    """Encode+invert(+stats) of n JPEGs through the distill job on this device, vs the same work in-process.

    The job runs with its defaults for the device (no --batch-size: sub-batches of `default_batch_size`,
    chunked to the GPU's memory; the device's dtype); `batch` is that default, for the comparison.
    `compile` is the job's --compile: auto (the default: the row says which mode the job chose and why), on
    (each actor compiles its DiT; the first sub-batch waits for it) or off.
    """
    need = _SECTION_OVERHEAD_S["ray"] + b.estimate_s(n * (b.vae_enc + b.args.inversion_step * 2 * b.fwd))
    compiled, why = compile_choice(compile, b.device.type, n)  # one actor: every image is its
    if compiled:
        need += _SECTION_OVERHEAD_S["compile"]
    if not b.fits(f"ray --compile {compile}", need):
        return []
    rows = []
    b.reset_memory()  # hand the allocator's cache back: the job's actor sizes its chunks to the free memory
    with tempfile.TemporaryDirectory(prefix="d3hr-bench-gpu-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        b.set_dtype(dtype)
        b.pipe.save_pretrained(tmp / "model")  # in the job's dtype: the actors load it as they would any model
        classes = class_names(b.pipe)[:4]  # folder names the job maps to the model's classes
        _write_images(tmp / "data", n, classes, b.spec.resolution)
        prep = time.perf_counter() - t
        cfg = DistillConfig(
            data=str(tmp / "data"),
            model=str(tmp / "model"),
            output=str(tmp / "out"),
            stats_only=True,
            batch_size=None if b.cuda else batch,
            dtype=dtype,
            encode="sample",
            steps=b.args.steps,
            inversion_step=b.args.inversion_step,
            guidance=b.args.guidance,
            shard_size=max(n, 1),
            num_gpus=1.0 if b.cuda else None,  # on a GPU: fail at once if Ray sees none
            compile=compile,
        )
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        b.res.data["info"]["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
        t = time.perf_counter()
        manifest = run_job(cfg).manifest
        total = time.perf_counter() - t
        stage = manifest["stages"]["encode+invert+stats"]
        per_image = b.vae_enc + b.args.inversion_step * 2 * b.fwd
        flag = f" --compile {compile}" + (f" ({why})" if compile == "auto" else "")
        common = dict(dtype=dtype, batch=batch, compiled=compiled, compile=compile)
        rows.append(
            b.record(
                "ray",
                f"distill --stats-only{flag} {dtype} B={batch} ({n} JPEGs, {len(classes)} classes)",
                stage["items"],
                stage["seconds"],
                per_image,
                job_total_s=total,
                prep_s=prep,
                status=manifest.get("status"),
                note="stage time incl. actor start and model load",
                **common,
            )
        )
        rows.append(
            b.record(
                "ray",
                f"  whole job{flag} incl. Ray start, listing, writing",
                stage["items"],
                total,
                per_image,
                **common,
            )
        )
        if in_process:
            b.res.note(
                f"ray: in-process encode+invert at {dtype} B={batch}: {in_process['per_s']:.2f} images/s; "
                f"the job's stage: {rows[0]['per_s']:.2f} images/s ({rows[0]['per_s'] / in_process['per_s']:.2f}x)"
            )
        ray.shutdown()
    return rows


def section_compile(b: Bench, dtype: str, batches: Sequence[int]) -> list[dict]:
    """Encode+invert with the transformer compiled (torch.compile, static shapes): the warm-up is the compile."""
    if not b.fits("compile", _SECTION_OVERHEAD_S["compile"]):
        return []
    b.set_dtype(dtype)
    b.pipe.transformer.compile(dynamic=False)
    try:
        return section_encode(b, (dtype,), batches, label="compiled")
    finally:
        b.pipe.transformer._compiled_call_impl = None  # back to eager for anything after


# -- driver -----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny shapes (for the CPU): checks the bench end to end")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--sections", nargs="+", default=list(DEFAULT_SECTIONS), choices=SECTIONS, help="what to run (in this order)"
    )
    p.add_argument(
        "--encode-batches", type=int, nargs="+", default=None, help="encode+invert batch sizes (default: the shape's)"
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=sorted(_DTYPES),
        help="encode+invert dtypes (default: bfloat16 float16)",
    )
    p.add_argument("--ray-images", type=int, default=None, help="JPEGs through the Ray job (default: the shape's)")
    p.add_argument(
        "--budget-s", type=float, default=330.0, help="wall-clock budget; sections that would not fit are skipped"
    )
    p.add_argument("--out", default="bench-gpu.json", help="JSON results, rewritten after every row")
    p.add_argument("--steps", type=int, default=50, help="DDIM grid size N")
    p.add_argument("--inversion-step", type=int, default=30, help="K")
    p.add_argument("--guidance", type=float, default=4.0, help="w")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "ray", "numpy", "d3hr_ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    return out


def table(data: dict) -> str:
    """The results as a Markdown table."""
    lines = [
        "| section | configuration | items | seconds | items/s | TFLOP/s | MFU | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        tf = f"{r['tflops']:.1f}" if r.get("tflops") is not None else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        lines.append(
            f"| {r['section']} | {r['config']} | {r['items']} | {r['seconds']:.2f} | {r['per_s']:,.2f} | {tf} | {mfu} "
            f"| {r.get('note', '')} |"
        )
    return "\n".join(lines)


def speedups(data: dict) -> dict:
    """The issue's targets: best encode+invert vs the paper-style loop, batched vs one-at-a-time generation."""
    rows = data["rows"]
    enc = [r for r in rows if r["section"] == "encode"]
    paper = [r for r in rows if r["section"] == "paper" and r.get("batch", 1) > 1]
    gen = [r for r in rows if r["section"] == "generate"]
    one = [r for r in gen if r["batch"] == 1]
    out = {}
    if enc:
        best = max(enc, key=lambda r: r["per_s"])
        out["encode_best"] = {"config": best["config"], "per_s": best["per_s"], "mfu": best.get("mfu")}
        if paper:
            out["encode_vs_paper"] = best["per_s"] / paper[0]["per_s"]
    if one and len(gen) > 1:
        out["generate_best_vs_one"] = max(r["per_s"] for r in gen) / one[0]["per_s"]
    paper_one = [r for r in rows if r["section"] == "paper" and r.get("batch") == 1]
    if paper_one and len(gen) > 1:
        out["generate_best_vs_paper_one"] = max(r["per_s"] for r in gen) / paper_one[0]["per_s"]
    return out


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    budget = Budget(t_start + args.budget_s)
    shape = SHAPES["tiny" if args.tiny else "xl"]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "shape": "tiny" if args.tiny else "xl",
        "steps": args.steps,
        "inversion_step": args.inversion_step,
        "guidance": args.guidance,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    res = Results(Path(args.out), info)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note on casting with .to() repeats at every dtype switch
    try:
        return _run(args, shape, device, res, budget, t_start)
    finally:  # the caller's diffusers logging is left as it was (tests call run() in-process)
        diffusers_logging.set_verbosity(verbosity)


def _run(
    args: argparse.Namespace, shape: dict, device: torch.device, res: Results, budget: Budget, t_start: float
) -> int:
    info = res.data["info"]
    print(f"# bench gpu: {info['device']}, {info['versions']}", flush=True)
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_peak(device, shape["matmul"], peak_dtype)
    res.data["info"]["peak"] = {"flops": peak, "n": shape["matmul"], "dtype": str(peak_dtype)}
    res.save()
    print(f"# measured {str(peak_dtype)} matmul peak ({shape['matmul']}^3): {peak / 1e12:.3f} TFLOP/s", flush=True)

    b = Bench(args, shape, res, budget)
    b.peak = peak
    enc_rows: list[dict] = []
    for name in args.sections:
        if name == "peak":
            continue
        print(f"## {name} ({budget.left():.0f} s left)", flush=True)
        try:
            if name == "encode":
                enc_rows = section_encode(
                    b, args.dtypes or shape["dtypes"], args.encode_batches or shape["encode_batches"]
                )
            elif name == "select":
                section_select(b)
            elif name == "generate":
                section_generate(b, "bfloat16", shape["gen_batches"], shape["one_at_a_time"])
            elif name == "groups":
                section_groups(b, "bfloat16", shape["group_ipcs"], shape["group_images"])
            elif name == "paper":
                passes = min(_PAPER_INVERSION_PASSES, args.steps - 1)  # fewer only on a grid of < 39 steps (tests)
                section_encode(
                    b,
                    ("float16",),
                    (shape["paper_batch"],),
                    label=f"paper-style ({passes} passes)",
                    passes=passes,
                    section="paper",
                )
                section_generate(b, "float16", (), shape["one_at_a_time"], section="paper")
            elif name in ("ray", "ray_compile"):
                same = [r for r in enc_rows if r["dtype"] == "bfloat16" and r["batch"] == shape["ray_batch"]]
                section_ray(
                    b,
                    args.ray_images or shape["ray_images"],
                    shape["ray_batch"],
                    "bfloat16",
                    same[0] if same else None,
                    compile="on" if name == "ray_compile" else "auto",
                )
            elif name == "compile":
                section_compile(b, "bfloat16", shape["compile_batches"])
        except Exception as e:  # a failed section is recorded; the others still run
            traceback.print_exc()
            res.skip(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    res.data["speedups"] = speedups(res.data)
    res.data["info"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    res.save()
    print(table(res.data))
    print(json.dumps(res.data["speedups"], indent=1))
    return 0
