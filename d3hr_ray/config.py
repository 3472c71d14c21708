"""The distillation job's configuration: one frozen, validated dataclass (flags and YAML: `d3hr_ray.flags`).

Every validation message names the flag, so the command line can print it as one line. No torch here:
a config parses before any model code loads.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from d3hr_ray.data.listing import CLASS_MAP_HELP, CLASS_NAMES_HELP
from d3hr_ray.flags import require, require_positive_ints
from d3hr_ray.stages import ENCODE_MODES  # one list of modes for the library and the job

__all__ = ["CANDIDATE_SOURCES", "COMPILE_MODES", "DTYPES", "LATENT_SOURCES", "DistillConfig"]

DTYPES = ("float32", "bfloat16", "float16")
LATENT_SOURCES = ("d3hr", "noise")
COMPILE_MODES = ("auto", "on", "off")
# Where D3HR's candidate groups come from: the class Gaussian (the paper's), or the class's real inverted latents.
CANDIDATE_SOURCES = ("gaussian", "real")


@dataclass(frozen=True)
class DistillConfig:
    """Everything `python -m d3hr_ray.distill` needs. Field docs are the flags' help texts."""

    data: str = field(
        default="digits",
        metadata={
            "help": "input, local or s3://: an ImageFolder root (<root>/<class>/<image>); Parquet file(s) or a folder "
            "of them; WebDataset .tar shards (a folder, one .tar, a brace pattern shards-{000000..000127}.tar, or a "
            "wids index .json); a Hugging Face dataset folder written by save_to_disk (one split's folder); or "
            "'digits' (scikit-learn's 8x8 digits; 'digits:train' and 'digits:test' are a fixed 3:1 split)"
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": CLASS_NAMES_HELP},
    )
    class_map: str | None = field(
        default=None,
        metadata={"help": CLASS_MAP_HELP},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "DiTPipeline: local folder, s3://bucket/prefix or hub id; default: the bundled digits model for "
            "--data digits"
        },
    )
    output: str = field(default="d3hr-output", metadata={"help": "output folder, local or s3://"})
    ipc: int = field(default=10, metadata={"help": "distilled images per class"})
    steps: int = field(default=50, metadata={"help": "DDIM grid size N (tau_k = k * T / N)"})
    inversion_step: int = field(default=30, metadata={"help": "K: invert to timestep tau_K (30 of 50 = t 600)"})
    start_step: int | None = field(
        default=None, metadata={"help": "step where generation starts (default: --inversion-step)"}
    )
    guidance: float = field(default=4.0, metadata={"help": "classifier-free guidance scale w"})
    candidates: int = field(default=100_000, metadata={"help": "candidate groups scored per class (m)"})
    score_weights: tuple[float, float, float] = field(
        default=(1.0, 1.0, 0.1), metadata={"help": "l_mu,l_sd,l_sk weights of the group score"}
    )
    latents: str = field(
        default="d3hr",
        metadata={
            "help": "the z_K that generation starts from: 'd3hr' (group sampling from the class statistics) or "
            "'noise' (N(0, I): the paper's ablation)"
        },
    )
    candidates_from: str = field(
        default="gaussian",
        metadata={
            "help": "where the m candidate groups are drawn: 'gaussian' (the class statistics, the paper's) or "
            "'real' (groups of the class's real inverted latents, kept by --keep-latents; the output is the "
            "chosen real images)"
        },
    )
    keep_latents: bool = field(
        default=False,
        metadata={
            "help": "keep every input's inverted latent z_K (float16, with its key) in <output>/_state/latents/, for "
            "--candidates-from real"
        },
    )
    stats_per_class: int | None = field(
        default=None,
        metadata={
            "help": "compute the statistics from this many inputs per class (a seeded draw from the listing; "
            "default: every input)"
        },
    )
    encode: str = field(default="sample", metadata={"help": "VAE posterior: 'sample' (seeded per image) or 'mean'"})
    seed: int = field(default=0, metadata={"help": "global seed; per-image and per-class seeds derive from it"})
    output_size: int | None = field(
        default=None, metadata={"help": "side of the distilled images (default: the source images' size)"}
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "images per encode/invert sub-batch (default: 64 on CPUs; 256 on GPUs, each run in chunks that "
            "fit the GPU's free memory)"
        },
    )
    max_actors: int | None = field(
        default=None,
        metadata={
            "help": "most model actors per stage (default: GPUs in the cluster, else one single-threaded actor per CPU)"
        },
    )
    num_gpus: float | None = field(
        default=None, metadata={"help": "GPUs per model actor (default: 1 when the cluster has GPUs, else 0)"}
    )
    actor_resources: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "custom Ray resources each model actor needs, name=amount pairs, comma-separated (e.g. "
            "'ondemand=1' keeps model actors on the nodes that declare that resource, such as a KubeRay "
            "worker group's rayStartParams resources)"
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "model dtype: float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)"},
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "torch.compile the DiT in each model actor: auto (compile when the plan gives each actor more "
            "images than the measured break-even on its device type, workers/resources.COMPILE_BREAK_EVEN_IMAGES; "
            "eager otherwise), on, off. A bare --compile means on",
            "const": "on",
            "false": "off",
        },
    )
    images_per_call: int | None = field(
        default=None,
        metadata={
            "help": "images a generation actor call samples and decodes together: whole classes of consecutive "
            "ids, fixed by class id (default: steps/generation.IMAGES_PER_CALL, 200 on GPUs, one class on CPUs)"
        },
    )
    classes: tuple[str, ...] | None = field(
        default=None, metadata={"help": "only these classes (names or ids, comma-separated)"}
    )
    strict: bool = field(
        default=False, metadata={"help": "fail on the first unreadable input instead of counting and skipping it"}
    )
    stats_only: bool = field(default=False, metadata={"help": "stop after writing stats.safetensors"})
    from_stats: str | None = field(
        default=None, metadata={"help": "skip the images: draw the distilled set from this stats.safetensors"}
    )
    shard_size: int = field(
        default=1024,
        metadata={
            "help": "inputs per shard, the unit of resumable work (one state file each; ImageNet-1K makes ~2,000)"
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "delete this job's files in --output (outputs and _state/) and start over instead of resuming"
        },
    )
    mlflow: str | None = field(
        default=None,
        metadata={
            "help": "MLflow tracking URI (default: MLFLOW_TRACKING_URI; unset: no tracking): the settings, the "
            "manifest, the stage timings and the grid; a resumed run continues its MLflow run"
        },
    )
    mlflow_experiment: str | None = field(
        default=None,
        metadata={"help": "MLflow experiment of a new run (default: MLFLOW_EXPERIMENT_NAME, else d3hr_ray.distill)"},
    )
    license: str = field(
        default="other",
        metadata={
            "help": "the license of the distilled set, as the dataset card (README.md) declares it: a Hugging Face "
            "license id such as cc-by-nc-4.0, or 'other' (the source data's and the model's licenses apply)"
        },
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Ray's and Ray Data's INFO logs, and Ray Data's progress off a terminal too (default: the job's "
            "own progress lines and stage table, Ray's warnings and errors)"
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "plan only: list the input, count the work, print GPU-hours, cost and output sizes; no Ray, no "
            "weights, nothing written"
        },
    )
    plan_peak_tflops: float = field(
        default=989.0,
        metadata={
            "help": "--dry-run: one GPU's dense bf16 peak in TFLOP/s (989: H100 SXM; measure yours with `benchmarks "
            "gpu`)"
        },
    )
    plan_mfu: float = field(
        default=0.37,
        metadata={
            "help": "--dry-run: the fraction of that peak the DiT and VAE passes sustain (0.37: DiT-XL/2 "
            "encode+invert measured on an H200, bf16, eager)"
        },
    )
    plan_price: float = field(default=2.5, metadata={"help": "--dry-run: the price of one GPU-hour (any currency)"})
    plan_images: int | None = field(
        default=None,
        metadata={
            "help": "--dry-run from counts: plan for this many images instead of listing --data (nothing is read, no "
            "credentials needed); with --plan-classes"
        },
    )
    plan_classes: int | None = field(
        default=None,
        metadata={
            "help": "--dry-run from counts: the classes of those images (the model's first N classes, the images "
            "shuffled across shards, the worst case for the statistics state); with --plan-images"
        },
    )

    def __post_init__(self) -> None:
        require_positive_ints(self, "ipc", "steps", "candidates", "shard_size")
        require_positive_ints(self, "batch_size", "images_per_call", "output_size", "max_actors", optional=True)
        require(
            self,
            isinstance(self.inversion_step, int) and 1 <= self.inversion_step < self.steps,
            "inversion_step",
            f"must be in 1..{self.steps - 1} (below --steps)",
        )
        if self.start_step is not None:
            require(
                self,
                isinstance(self.start_step, int) and 1 <= self.start_step < self.steps,
                "start_step",
                f"must be in 1..{self.steps - 1} (below --steps)",
            )
        require(self, self.guidance >= 0, "guidance", "must be >= 0")
        require(
            self,
            len(self.score_weights) == 3 and all(w >= 0 for w in self.score_weights),
            "score_weights",
            "must be three numbers >= 0 (l_mu,l_sd,l_sk)",
        )
        require(self, self.compile in COMPILE_MODES, "compile", f"must be one of {', '.join(COMPILE_MODES)}")
        require(self, self.latents in LATENT_SOURCES, "latents", f"must be one of {', '.join(LATENT_SOURCES)}")
        require(self, self.encode in ENCODE_MODES, "encode", f"must be one of {', '.join(ENCODE_MODES)}")
        require(
            self,
            self.candidates_from in CANDIDATE_SOURCES,
            "candidates_from",
            f"must be one of {', '.join(CANDIDATE_SOURCES)}",
        )
        if self.candidates_from == "real":
            require(
                self,
                self.latents == "d3hr",
                "candidates_from",
                "real draws groups of real latents; it cannot be combined with --latents noise",
            )
            require(
                self,
                self.keep_latents or self.from_stats is not None,
                "candidates_from",
                "real needs the inverted latents: add --keep-latents, or --from-stats of a run made with it",
            )
            require(
                self,
                not self.stats_only,
                "candidates_from",
                "real chooses images; it cannot be combined with --stats-only",
            )
        require(
            self,
            not (self.keep_latents and self.from_stats),
            "keep_latents",
            "keeps the latents the statistics are computed from; it cannot be combined with --from-stats",
        )
        if self.stats_per_class is not None:
            require(
                self,
                isinstance(self.stats_per_class, int) and self.stats_per_class >= 2,
                "stats_per_class",
                "must be an integer >= 2 (a class needs 2 inputs for a variance)",
            )
            require(
                self,
                self.from_stats is None,
                "stats_per_class",
                "cannot be combined with --from-stats (no statistics are computed)",
            )
        require(self, isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0")
        if self.num_gpus is not None:
            require(self, self.num_gpus >= 0, "num_gpus", "must be >= 0")
        if self.actor_resources is not None:
            require(
                self,
                len(self.actor_resources) >= 1 and all(_resource_pair(p) is not None for p in self.actor_resources),
                "actor_resources",
                "must be name=amount pairs with amounts > 0 and names other than CPU and GPU (--num-gpus sets those)",
            )
        if self.dtype is not None:
            require(self, self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        if self.classes is not None:
            require(
                self, len(self.classes) >= 1 and all(c for c in self.classes), "classes", "must name at least one class"
            )
        require(self, not (self.stats_only and self.from_stats), "stats_only", "cannot be combined with --from-stats")
        require(self, self.plan_peak_tflops > 0, "plan_peak_tflops", "must be > 0")
        require(self, 0 < self.plan_mfu <= 1, "plan_mfu", "must be in (0, 1]")
        require(self, self.plan_price >= 0, "plan_price", "must be >= 0")
        if self.plan_images is not None or self.plan_classes is not None:
            require(
                self,
                self.plan_images is not None and self.plan_classes is not None,
                "plan_images",
                "and --plan-classes go together",
            )
            require(self, self.dry_run, "plan_images", "plans from counts: add --dry-run")
            require(self, self.from_stats is None, "plan_images", "cannot be combined with --from-stats")
            require(
                self,
                isinstance(self.plan_classes, int) and self.plan_classes >= 1,
                "plan_classes",
                "must be an integer >= 1",
            )
            require(
                self,
                isinstance(self.plan_images, int)
                and isinstance(self.plan_classes, int)  # checked above; said again for the type checker
                and self.plan_images >= 2 * self.plan_classes,
                "plan_images",
                "must be an integer >= 2 x --plan-classes (a class needs 2 images for a variance)",
            )
        require(self, bool(self.data) and bool(self.output), "data", "and --output must be non-empty")
        license_id = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", self.license or "")
        require(self, bool(license_id), "license", "must be a license id such as cc-by-4.0, mit or other")

    @property
    def actor_resource_map(self) -> dict[str, float]:
        """--actor-resources as Ray's `resources` argument: {name: amount}; empty when unset."""
        pairs = [_resource_pair(p) for p in self.actor_resources or ()]
        return dict(p for p in pairs if p is not None)  # every pair is one: __post_init__ checked them

    @property
    def generation_start(self) -> int:
        """Where sampling starts: --start-step, else where the inversion stopped."""
        return self.start_step if self.start_step is not None else self.inversion_step

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _resource_pair(text: str) -> tuple[str, float] | None:
    """'name=amount' -> (name, amount), or None when it is not one (amount > 0; CPU and GPU have their own flags)."""
    name, sep, amount = str(text).partition("=")
    name = name.strip()
    try:
        value = float(amount)
    except ValueError:
        return None
    if not sep or not name or name in ("CPU", "GPU") or not value > 0:
        return None
    return name, value
