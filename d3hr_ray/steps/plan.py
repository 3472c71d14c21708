"""Plan mode (`distill --dry-run`): what a run will read, compute, cost and write, before any of it happens.

    listing (no image decoded)  +  model configs (no weights)  ->  work counts  ->  GPU-hours, cost, bytes

FLOPs per forward pass are counted, not guessed: the DiT and the VAE are built from their configs on
PyTorch's meta device (shapes only, no memory, no weights) and one forward pass of each runs under
`torch.utils.flop_counter.FlopCounterMode`, which adds 2 x M x N x K for every matrix product and
convolution (attention included). For DiT-XL/2 at 256 px that gives 237 GFLOP a pass, twice the
paper's 118.6 "Gflops" (which counts multiply-adds).

Work (docs/method.md; B images, w the guidance scale, g = 2 when w != 1 since CFG doubles the batch, else 1):

    encode      B VAE encoder passes
    invert      B * K * g DiT passes                  (K = --inversion-step)
    select      C * m candidate groups, 2 random draws per latent dimension each (stages/select.py)
    generate    C * IPC * S * g DiT passes + C * IPC VAE decoder passes   (S = --start-step, default K)

GPU time = FLOPs / (peak * MFU), with the peak and the MFU given as flags (defaults in
`config.DistillConfig`); selection is not matrix work and is timed at a measured draw rate instead.
Output sizes are exact for the tensors and estimated for PNG images (`PNG_BYTES_PER_PIXEL`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any, TypedDict

import torch
from torch.utils.flop_counter import FlopCounterMode

from d3hr_ray.artifacts.blocks import Blocks, block_size
from d3hr_ray.config import DistillConfig
from d3hr_ray.data.listing import Listing
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.workers.resources import compile_choice

__all__ = [
    "PLAN_ACTORS",
    "PNG_BYTES_PER_PIXEL",
    "SELECT_DRAWS_PER_S",
    "CompilePlan",
    "GpuHours",
    "ModelFlops",
    "ModelPlan",
    "Plan",
    "PlannedData",
    "Rates",
    "ReadPlan",
    "StatePlan",
    "WorkPlan",
    "counted_flops",
    "format_plan",
    "make_plan",
    "model_flops",
    "planned_data",
    "state_plan",
]

# PNG bytes per pixel and channel of natural images (about 0.8: CIFAR-10 re-encoded as PNG measures
# 2.3-2.7 KB per 32x32x3 image). An estimate: the plan says so.
PNG_BYTES_PER_PIXEL = 0.8
# Group selection's random draws per second on one GPU actor (2 per latent dimension per candidate):
# select_group on an H200 scored 706,000 groups/s at D = 4,096, IPC 10 (docs/performance.md, "GPU").
SELECT_DRAWS_PER_S = 706_000 * 2 * 4096
# Actors the dry run assumes when --max-actors is not given (it has no cluster to ask).
PLAN_ACTORS = 8
# The driver's statistics merge, per (class row x latent dimension) merged: Chan's update of float64 rows (a
# ClassStats.merge_partial of 1,000 x 4,096 rows: 0.26 s, best of 5), and per byte of block files read back and
# unpacked (local disk: 0.14 s for a 65.6 MB block). Measured on the 2-core project machine under load, 2026-12-07
# (docs/performance.md, "Statistics state"); a quiet machine or a cluster's head node is faster.
MERGE_S_PER_ELEMENT = 6.4e-8
READ_S_PER_BYTE = 2.1e-9


@dataclass(frozen=True)
class PlannedData:
    """--plan-images/--plan-classes: a data set known by its counts alone (nothing listed). The images are taken
    as spread evenly over the classes and shuffled across shards (the worst case for the statistics state).

    Attributes mirror `data.listing.Listing` where the plan reads them; `shards` is a range (len() is the count).
    """

    images: int
    names: dict[int, str]
    shards: range
    kind: str = "counts"
    native_size: int | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    listed: int | None = None

    @property
    def uri(self) -> str:
        return f"--plan-images {self.images:,} --plan-classes {len(self.names):,}"

    @property
    def counts(self) -> dict[int, int]:
        q, r = divmod(self.images, len(self.names))
        return {c: q + (i < r) for i, c in enumerate(sorted(self.names))}


def planned_data(images: int, classes: int, shard_size: int, model_names: list[str] | None) -> PlannedData:
    """The counts of --plan-images/--plan-classes as a listing for `make_plan`: the model's first `classes` classes
    (named by its id2label where it has one), in shards of `shard_size`."""
    names = {i: (model_names[i] if model_names and i < len(model_names) else str(i)) for i in range(classes)}
    return PlannedData(images=images, names=names, shards=range(math.ceil(images / shard_size)))


@dataclass(frozen=True)
class StatePlan:
    """What the statistics state will hold and cost: shards a block, blocks, bytes written (= read back, = peak on
    disk), the driver's final merge in seconds, and the driver's peak bytes for the statistics."""

    block: int
    blocks: int
    bytes: int
    merge_s: float
    driver_bytes: int


def state_plan(listing: Listing | PlannedData, n_cls: int, d: int) -> StatePlan:
    """What the statistics state will hold and cost (artifacts/blocks.py), from the listing's counts.

    A block's rows are the classes it holds: for shuffled data (any kind but an ImageFolder, whose shards follow
    the class folders) the expected distinct classes among its images, C (1 - exp(-images / C)); for class-sorted
    data about (images x C / N) + 1. Each row is (16 D + 16) bytes in the file. The merge is timed at
    MERGE_S_PER_ELEMENT and READ_S_PER_BYTE; the driver holds the merged ClassStats, two block files in flight and
    two blocks being filled.
    """
    n_img, shards = sum(listing.counts.values()), len(listing.shards)
    if shards == 0 or n_cls == 0:
        return StatePlan(block=1, blocks=0, bytes=0, merge_s=0.0, driver_bytes=0)
    b = block_size(shards, n_img, n_cls)
    n_blocks = len(Blocks(tuple(range(shards)), b))
    per_block_images = n_img / n_blocks
    if listing.kind == "imagefolder":
        rows = min(n_cls, per_block_images * n_cls / n_img + 1)
    else:
        rows = n_cls * (1 - math.exp(-per_block_images / n_cls))
    row_bytes = 16 * d + 16
    written = int(n_blocks * rows * row_bytes)
    merge_s = n_blocks * rows * d * MERGE_S_PER_ELEMENT + written * READ_S_PER_BYTE
    driver = n_cls * row_bytes + 4 * rows * row_bytes
    return StatePlan(block=b, blocks=n_blocks, bytes=written, merge_s=merge_s, driver_bytes=int(driver))


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` as torch's FlopCounterMode counts them (matmuls, convolutions, attention), no grad."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class ModelFlops(TypedDict):
    """FLOPs of one forward pass per image (`model_flops`), and the models' parameter counts."""

    dit: int
    encode: int
    decode: int
    dit_params: int
    vae_params: int


def model_flops(transformer_config: dict[str, Any], vae_config: dict[str, Any]) -> ModelFlops:
    """FLOPs of one forward pass per image, counted on the meta device from the configs alone.

    Args:
        transformer_config: a DiTTransformer2DModel config (diffusers' transformer/config.json).
        vae_config: an AutoencoderKL config (vae/config.json).
    Returns:
        {"dit": FLOPs of one DiT pass on one latent, "encode": VAE encoder pass on one image,
         "decode": VAE decoder pass on one latent, "dit_params": int, "vae_params": int}.
    """

    # diffusers only here: a --dry-run counts FLOPs on the models, a job's driver never builds one.
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    def clean(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    with torch.device("meta"):
        dit = DiTTransformer2DModel.from_config(clean(transformer_config))
        vae = AutoencoderKL.from_config(clean(vae_config))
    c, h = dit.config.in_channels, dit.config.sample_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.zeros(1, c, h, h, device="meta")  # (1, c, h, w)
    x = torch.zeros(1, vae.config.in_channels, h * factor, h * factor, device="meta")  # (1, 3, R, R)
    one = torch.zeros(1, dtype=torch.int64, device="meta")  # a timestep, a class id

    return {
        "dit": counted_flops(lambda: dit(z, timestep=one, class_labels=one)),
        "encode": counted_flops(lambda: vae.encode(x)),
        "decode": counted_flops(lambda: vae.decode(z)),
        "dit_params": sum(p.numel() for p in dit.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
    }


@dataclass(frozen=True)
class ReadPlan:
    """What the run reads: the listing's counts (per_class: name -> inputs of the classes distilled), the inputs it
    refused as (location, reason), and the inputs listed before --stats-per-class narrowed them."""

    uri: str
    kind: str
    images: int
    classes: int
    shards: int
    per_class: dict[str, int]
    refused: list[tuple[str, str]]
    native_size: int | None
    listed: int


@dataclass(frozen=True)
class ModelPlan:
    """The model's shape and cost: its latents, resolution, classes, and FLOPs a pass (`model_flops`)."""

    model: str | None
    latent_shape: tuple[int, ...]
    latent_dim: int
    resolution: int
    classes: int
    flops: ModelFlops


@dataclass(frozen=True)
class WorkPlan:
    """The work of each stage (the module's docstring) and its FLOPs."""

    encode_passes: int
    invert_dit_passes: int
    select_groups: int
    select_draws: int
    generate_dit_passes: int
    decode_passes: int
    encode_flops: int
    invert_flops: int
    generate_flops: int


@dataclass(frozen=True)
class Rates:
    """The rates the GPU time is priced at (--plan-peak-tflops, --plan-mfu, --plan-price; SELECT_DRAWS_PER_S)."""

    peak_tflops: float
    mfu: float
    price_per_gpu_hour: float
    select_draws_per_s: float


@dataclass(frozen=True)
class GpuHours:
    """GPU-hours a stage, and in all (rounded to 4 places)."""

    encode: float
    invert: float
    generate: float
    select: float
    total: float


@dataclass(frozen=True)
class CompilePlan:
    """A stage's --compile choice on the planned actors, why, and the images each actor takes."""

    compile: bool
    reason: str
    images_per_actor: float


@dataclass(frozen=True)
class Plan:
    """What `distill --dry-run` reports (`make_plan`; printed by `format_plan`).

    read: None with --from-stats (no images read); state: the statistics state, None with --from-stats;
    compile: stage ("encode+invert", "generate") -> its choice; outputs: file -> bytes (some estimated).
    """

    read: ReadPlan | None
    model: ModelPlan
    work: WorkPlan
    rates: Rates
    gpu_hours: GpuHours
    cost: float
    max_actors: int | None
    compile: dict[str, CompilePlan]
    state: StatePlan | None
    outputs: dict[str, int]
    output: str


def make_plan(
    cfg: DistillConfig,
    spec: ModelSpec,
    configs: dict[str, dict[str, Any]],
    listing: Listing | PlannedData | None,
    classes: dict[int, str],
    output_size: int,
) -> Plan:
    """The plan of a run.

    Args:
        cfg: the DistillConfig (its --dry-run rates: plan_peak_tflops, plan_mfu, plan_price).
        configs: {"transformer": dict, "vae": dict}, the model's configs.
        listing: the listing (or --plan-images' counts), or None with --from-stats (no images read).
        classes: {class id: name} that will be distilled.
        output_size: side of the distilled images.
    """
    flops = model_flops(configs["transformer"], configs["vae"])
    d = spec.latent_channels * spec.latent_size**2
    g = 1 if cfg.guidance == 1.0 else 2
    n_img = sum(listing.counts.values()) if listing is not None else 0
    n_cls = len(classes)
    n_out = n_cls * cfg.ipc
    invert_passes, generate_passes = n_img * cfg.inversion_step * g, n_out * cfg.generation_start * g
    work = WorkPlan(
        encode_passes=n_img,
        invert_dit_passes=invert_passes,
        select_groups=n_cls * cfg.candidates,
        select_draws=n_cls * cfg.candidates * 2 * d,
        generate_dit_passes=generate_passes,
        decode_passes=n_out,
        encode_flops=n_img * flops["encode"],
        invert_flops=invert_passes * flops["dit"],
        generate_flops=generate_passes * flops["dit"] + n_out * flops["decode"],
    )
    rate = cfg.plan_peak_tflops * 1e12 * cfg.plan_mfu  # model FLOP/s one GPU sustains
    hours = {
        "encode": work.encode_flops / rate / 3600,
        "invert": work.invert_flops / rate / 3600,
        "generate": work.generate_flops / rate / 3600,
        "select": work.select_draws / SELECT_DRAWS_PER_S / 3600,
    }
    gpu_hours = sum(hours.values())

    channels = configs["vae"].get("out_channels", 3)
    png = PNG_BYTES_PER_PIXEL * output_size**2 * channels
    c_model = spec.num_classes
    state = state_plan(listing, n_cls, d) if listing is not None else None
    outputs = {
        "stats.safetensors": c_model * d * 4 * 2 + c_model * 8,
        "latents.safetensors": n_out * d * 4,
        "images/ (PNG, estimated)": int(n_out * png),
        "distilled.parquet (estimated)": int(n_out * png),
        "_state/blocks (estimated)": state.bytes if state else 0,
        "_state/classes (estimated)": int(n_out * (d * 4 + png)),
    }
    actors = cfg.max_actors or PLAN_ACTORS
    compile_plan = {}
    for stage, n in (("encode+invert", n_img), ("generate", n_out)):
        on, why = compile_choice(cfg.compile, "cuda", n / actors)
        compile_plan[stage] = CompilePlan(compile=on, reason=why, images_per_actor=n / actors)
    read = None
    if listing is not None:
        counts = listing.counts
        read = ReadPlan(
            uri=listing.uri,
            kind=listing.kind,
            images=n_img,
            classes=n_cls,
            shards=len(listing.shards),
            per_class={classes[c]: counts[c] for c in sorted(counts) if c in classes},
            refused=[(loc, why) for loc, why in listing.skipped],
            native_size=listing.native_size,
            listed=listing.listed if listing.listed is not None else n_img,
        )
    return Plan(
        read=read,
        model=ModelPlan(
            model=cfg.model,
            latent_shape=tuple(spec.latent_shape),
            latent_dim=d,
            resolution=spec.resolution,
            classes=spec.num_classes,
            flops=flops,
        ),
        work=work,
        rates=Rates(
            peak_tflops=cfg.plan_peak_tflops,
            mfu=cfg.plan_mfu,
            price_per_gpu_hour=cfg.plan_price,
            select_draws_per_s=SELECT_DRAWS_PER_S,
        ),
        gpu_hours=GpuHours(**{k: round(v, 4) for k, v in hours.items()}, total=round(gpu_hours, 4)),
        cost=round(gpu_hours * cfg.plan_price, 2),
        max_actors=cfg.max_actors,
        compile=compile_plan,
        state=state,
        outputs=outputs,
        output=cfg.output,
    )


def _n(x: float) -> str:
    """1234567 -> '1.23M' (k, M, G, T, P, E)."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _bytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{int(x)} B"


def _hours(h: float) -> str:
    """GPU time: '0.8 s', '12 min', '3.4 h'."""
    s = h * 3600
    return f"{s:.2g} s" if s < 60 else f"{s / 60:.3g} min" if s < 3600 else f"{h:,.3g} h"


def format_plan(plan: Plan, cfg: DistillConfig) -> str:
    """The plan as the lines `distill --dry-run` prints."""
    lines = ["plan (--dry-run: nothing computed, nothing written)"]
    r, m, w = plan.read, plan.model, plan.work
    if r is None:
        lines.append(f"read      no images: statistics from {cfg.from_stats}")
    else:
        counts = list(r.per_class.values())
        lines.append(
            f"read      {r.uri} ({r.kind}): {r.images:,} images in {r.classes:,} classes, "
            f"{r.shards:,} shards of <= {cfg.shard_size:,}"
        )
        if cfg.stats_per_class is not None:
            lines.append(
                f"          statistics from a seeded subset: --stats-per-class {cfg.stats_per_class:,} of "
                f"{r.listed:,} "
                f"listed ({100 * r.images / max(r.listed, 1):.2g}% of the encoding and inversion)"
            )
        if counts:
            lines.append(f"          per class: min {min(counts):,}, median {median(counts):,.0f}, max {max(counts):,}")
        if len(counts) <= 20:
            lines.append("          " + ", ".join(f"{name} {k:,}" for name, k in r.per_class.items()))
        if r.refused:
            reasons: dict[str, int] = {}
            for _, why in r.refused:
                reasons[why] = reasons.get(why, 0) + 1
            shown = "; ".join(f"{k:,} {why}" for why, k in reasons.items())
            lines.append(f"          refused by the listing (not read): {shown}; first: {r.refused[0][0]}")
    fl = m.flops
    lines.append(
        f"model     {m.model}: latents {'x'.join(map(str, m.latent_shape))} (D = {m.latent_dim:,}), "
        f"{m.resolution} px, {m.classes:,} classes; DiT {_n(fl['dit_params'])} params, VAE {_n(fl['vae_params'])}"
    )
    lines.append(
        f"          FLOPs per image: DiT pass {_n(fl['dit'])}, VAE encode {_n(fl['encode'])}, "
        f"VAE decode {_n(fl['decode'])}"
    )
    g = "x 2 (CFG)" if cfg.guidance != 1.0 else "(w = 1: no CFG batch)"
    lines.append(f"work      encode   {w.encode_passes:,} VAE encoder passes: {_n(w.encode_flops)}FLOP")
    lines.append(
        f"          invert   {w.invert_dit_passes:,} DiT passes (K = {cfg.inversion_step} {g}): "
        f"{_n(w.invert_flops)}FLOP"
    )
    lines.append(
        f"          select   {w.select_groups:,} candidate groups (m = {cfg.candidates:,} per class): "
        f"{_n(w.select_draws)} random draws"
    )
    lines.append(
        f"          generate {w.generate_dit_passes:,} DiT passes ({cfg.ipc} per class, {cfg.generation_start} "
        f"steps {g}) "
        f"+ {w.decode_passes:,} decodes: {_n(w.generate_flops)}FLOP"
    )
    h, rt = plan.gpu_hours, plan.rates
    lines.append(
        f"cost      {h.total:,.4g} GPU-hours ({_hours(h.total)}) at {rt.peak_tflops:g} TFLOP/s x MFU {rt.mfu:g}: "
        f"{plan.cost:,.2f} at {rt.price_per_gpu_hour:g} per GPU-hour"
    )
    lines.append(
        f"          encode {_hours(h.encode)}, invert {_hours(h.invert)}, select {_hours(h.select)} "
        f"(at {rt.select_draws_per_s:.2g} draws/s), generate {_hours(h.generate)}"
    )
    gpus = plan.max_actors or PLAN_ACTORS
    lines.append(
        f"          wall time on {gpus} GPUs: about {_hours(h.total / gpus)} plus start-up "
        f"(each actor loads the model once)"
    )
    for i, (stage, c) in enumerate(plan.compile.items()):
        lines.append(f"{'compile' if i == 0 else '':<10}{stage}: {c.reason} (GPUs, {gpus} actors)")
    st = plan.state
    if st is not None and st.blocks:
        lines.append(
            f"state     statistics in {st.blocks:,} blocks of {st.block:,} shards: about {_bytes(st.bytes)} "
            f"written and read back; final merge about {_hours(st.merge_s / 3600)} on the driver, which holds "
            f"about {_bytes(st.driver_bytes)} for the statistics"
        )
    total = sum(plan.outputs.values())
    lines.append(f"outputs   {plan.output}: about {_bytes(total)}")
    for name, size in plan.outputs.items():
        lines.append(f"          {name:<32} {_bytes(size)}")
    return "\n".join(lines)
