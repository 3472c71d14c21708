"""`EvaluateConfig`, the flags of `python -m d3hr_ray.evaluate`, and the names it checks them against.

Torch-free (like every job's config): the job's flags parse and `--help` prints without torch or Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from d3hr_ray.evaluation.records import JSONObject
from d3hr_ray.flags import require, require_positive_ints
from d3hr_ray.training.choices import CORESET_RULES, STUDENT_LRS
from d3hr_ray.training.harness import ClassifierRunFields

__all__ = ["BASELINES", "CHOOSERS", "DATA_KINDS", "EVALUATIONS_PER_RUN", "LABELS", "RESULT_KEYS", "EvaluateConfig"]

# Baselines that choose --ipc images per class of --real (random, or a coreset of the teacher's features).
CHOOSERS = ("random-real", *CORESET_RULES)
BASELINES = (*CHOOSERS, "full")
# The label regimes (docs/evaluate.md, "Label regimes") and the loop objective of each.
LABELS = {"kd": "kd", "soft": "soft", "hard": "ce"}
# The settings a repeat's result depends on, stored with it (repeats/seed-<s>.json): a rerun into the same
# --output with other values is refused instead of reporting the old result under the new settings.
# Not among them: the worker count and device (the protocol does not depend on them for a cached set),
# and where things are written.
RESULT_KEYS = (
    "distilled",
    "baseline",
    "real",
    "ipc",
    "test",
    "teacher",
    "teacher_arch",
    "student",
    "labels",
    "resolution",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "temperature",
    "crop_scale",
    "cutmix_alpha",
    "cutmix_p",
    "eval_every",
)
# Test evaluations in a run when --eval-every is not given: one every epochs / 20 epochs.
EVALUATIONS_PER_RUN = 20
# The kinds of data the classifier jobs read (d3hr_ray/data/sources.py's registry), for their help texts.
DATA_KINDS = (
    "an ImageFolder, Parquet (a file or a folder), WebDataset shards (.tar files, a brace pattern, or a wids "
    "index.json) or a saved Hugging Face dataset (a save_to_disk folder), local or s3://"
)


@dataclass(frozen=True)
class EvaluateConfig(ClassifierRunFields):
    """Everything `python -m d3hr_ray.evaluate` needs. Field docs are the flags' help texts."""

    distilled: str | None = field(
        default=None,
        metadata={"help": "the training set: a distill output folder (local or s3://), or any data --real takes"},
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "instead of --distilled: 'random-real' (--ipc random images per class of --real), 'herding' or "
            "'k-center' (--ipc per class chosen from the teacher's features) or 'full' (all of --real)"
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "a text file (local or s3://) naming integer labels of --real and --test in order, one a line: "
            "WebDataset .cls labels, Parquet labels without ClassLabel names (default: a classes.txt beside "
            "WebDataset shards, else the numbers)"
        },
    )
    real: str | None = field(
        default=None,
        metadata={"help": f"the real training data for --baseline: {DATA_KINDS}, or 'digits:train'"},
    )
    ipc: int | None = field(
        default=None, metadata={"help": "images per class for --baseline random-real, herding, k-center"}
    )
    test: str = field(
        default="digits:test",
        metadata={"help": f"the real test set: {DATA_KINDS}, or 'digits:test'"},
    )
    labels: str = field(
        default="kd",
        metadata={
            "help": "targets: 'kd' (the teacher on every augmented batch, the paper's), 'soft' (the teacher's "
            "targets of each image, computed once) or 'hard' (the class labels, cross-entropy)"
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "a train_teacher folder, a state-dict file (.pth/.pt/.safetensors; then --teacher-arch), local "
            "or s3://, or torchvision:<model>[:<weights>] (e.g. torchvision:resnet18:IMAGENET1K_V1, from torch.hub's "
            "cache under TORCH_HOME); needed unless --labels hard (then it still names the classes, resolution and "
            "normalisation)"
        },
    )
    teacher_arch: str | None = field(
        default=None, metadata={"help": "the architecture of a bare --teacher weights file"}
    )
    student: str = field(
        default="conv3",
        metadata={
            "help": "student architecture (registry: conv3, resnet18, resnet18_modified, resnet50, resnet101, "
            "mobilenet_v2, efficientnet_b0, vgg11)"
        },
    )
    resolution: int | None = field(default=None, metadata={"help": "image side (default: the teacher's)"})
    epochs: int = field(
        default=400, metadata={"help": "epochs (docs/method.md: 300 ImageNet-1K and Tiny-ImageNet, 400 CIFAR)"}
    )
    batch_size: int = field(default=64, metadata={"help": "global batch size"})
    temperature: float = field(default=20.0, metadata={"help": "soft-label temperature T"})
    crop_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={"help": "RandomResizedCrop area range"})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta(a, a) parameter; 0 turns CutMix off"})
    cutmix_p: float = field(default=1.0, metadata={"help": "probability of CutMix per batch"})
    eval_every: int | None = field(
        default=None, metadata={"help": "epochs between test evaluations (default: epochs / 20)"}
    )
    repeats: int = field(default=3, metadata={"help": "runs with seeds seed, seed+1, ..."})
    seed: int = field(
        default=0, metadata={"help": "first seed (student init, order, augmentation, random-real subset)"}
    )
    output: str = field(
        default="eval-output", metadata={"help": "results.json, results.md and per-repeat results (local or s3://)"}
    )
    label: str | None = field(default=None, metadata={"help": "row label in results.md (default: from the inputs)"})
    name: str = field(
        default="d3hr-eval", metadata={"help": "run name prefix; rerunning with the same name and storage resumes"}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "print what would be trained (images, classes, steps, student, teacher) from the listings and "
            "the teacher's metadata; no Ray, no training, nothing written"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self,
            (self.distilled is None) != (self.baseline is None),
            "distilled",
            "or --baseline is needed (exactly one)",
        )
        require(self, self.labels in LABELS, "labels", f"must be one of {', '.join(LABELS)}")
        if self.baseline is not None:
            require(self, self.baseline in BASELINES, "baseline", f"must be one of {', '.join(BASELINES)}")
            require(self, self.real is not None, "real", "is needed with --baseline (the real training data)")
            if self.baseline in CHOOSERS:
                require(
                    self,
                    isinstance(self.ipc, int) and self.ipc >= 1,
                    "ipc",
                    f"must be an integer >= 1 with --baseline {self.baseline}",
                )
        require(self, self.student in STUDENT_LRS, "student", f"must be one of {', '.join(STUDENT_LRS)}")
        if self.teacher_arch is not None:
            require(self, self.teacher_arch in STUDENT_LRS, "teacher_arch", f"must be one of {', '.join(STUDENT_LRS)}")
            require(
                self,
                not (self.teacher or "").startswith("torchvision:"),
                "teacher_arch",
                "is for a bare weights file; --teacher torchvision:<model> names its architecture",
            )
        require_positive_ints(self, "repeats")
        if self.eval_every is not None:
            require(self, self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self, self.temperature > 0, "temperature", "must be > 0")
        require(
            self,
            self.cutmix_alpha >= 0 and 0 <= self.cutmix_p <= 1,
            "cutmix_alpha",
            "must be >= 0 (and --cutmix-p in [0, 1])",
        )
        require(self, isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0")
        require(
            self,
            self.teacher is not None or (self.labels == "hard" and self.baseline not in CORESET_RULES),
            "teacher",
            "is needed with --labels kd or soft and with --baseline herding or k-center",
        )

    @property
    def method(self) -> str:
        if self.baseline == "full":
            return "full real data"
        if self.baseline == "random-real":
            return f"random real, IPC {self.ipc}"
        if self.baseline is not None:
            return f"{self.baseline}, IPC {self.ipc}"
        return "distilled"

    @property
    def seeds(self) -> range:
        """The repeats' seeds: seed, seed + 1, ..."""
        return range(self.seed, self.seed + self.repeats)

    @property
    def train_uri(self) -> str:
        """Where the training set is read from: the distilled set (before a distill folder is resolved), or --real."""
        uri = self.distilled if self.baseline is None else self.real
        if uri is None:  # __post_init__ refuses this; the check narrows the type
            raise ValueError("--distilled or --baseline with --real is needed")
        return uri

    def eval_every_or_default(self) -> int:
        """--eval-every, else one evaluation every epochs / EVALUATIONS_PER_RUN epochs."""
        return self.eval_every or max(1, self.epochs // EVALUATIONS_PER_RUN)

    def result_settings(self) -> JSONObject:
        """The settings a repeat's numbers depend on (RESULT_KEYS), as its file stores them (JSON values)."""
        settings = {**{key: getattr(self, key) for key in RESULT_KEYS}, "eval_every": self.eval_every_or_default()}
        return json.loads(json.dumps(settings))
