"""README.md: the dataset card of a distilled set, so the output folder loads and publishes as a Hugging Face dataset.

    card_metadata(manifest)   the YAML front matter: license, tags, `configs` (the default config's one split is
                              distilled.parquet, so `datasets.load_dataset(<output>)` reads its rows and nothing
                              else in the folder), `dataset_info.features` (image, label with its ClassLabel names,
                              class)
    card_text(manifest)       the whole card: front matter, then what the set is, how it was made, its counts and
                              per-class scores, how to load and publish it
    write_card(out, manifest) both, into `<output>/README.md`

The ClassLabel names are `outputs.label_names` of the manifest's classes, the list distilled.parquet's schema holds,
so the card and the file never disagree. Class names are any text: the YAML is written by PyYAML (quoted where a
name needs it) and the Markdown body escapes them. Pure Python, no torch.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from typing import Any

import yaml

from d3hr_ray.artifacts.outputs import label_names
from d3hr_ray.artifacts.report import Manifest
from d3hr_ray.storage.fs import OutputDir

__all__ = ["CARD_FILE", "card_metadata", "card_text", "write_card"]

CARD_FILE = "README.md"
DATA_FILE = "distilled.parquet"
TAGS = ("dataset-distillation", "d3hr", "synthetic", "image-classification")
# The Hub's size_categories buckets: (upper bound on rows, label).
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
_PAPER = (
    "Zhao et al., *Taming Diffusion for Dataset Distillation with High Representativeness*, ICML 2025 "
    "([arXiv 2505.18399](https://arxiv.org/abs/2505.18399))"
)
# The settings the card's table shows (every setting is in manifest.json).
_SETTINGS = (
    "ipc",
    "steps",
    "inversion_step",
    "start_step",
    "guidance",
    "candidates",
    "score_weights",
    "latents",
    "candidates_from",
    "encode",
    "seed",
    "output_size",
    "stats_per_class",
    "classes",
)


def _distilled(manifest: Manifest) -> dict[int, str]:
    """Class id -> name of the classes the run distils (the manifest's class_ids and class_names)."""
    return dict(zip(manifest.class_ids, manifest.class_names, strict=True))


def _rows(manifest: Manifest) -> int:
    """Rows of distilled.parquet: IPC a distilled class (none for --stats-only or a run that wrote no Parquet)."""
    if manifest.status == "failed":
        return 0
    return len(_distilled(manifest)) * manifest.ipc


def card_metadata(manifest: Manifest) -> dict[str, Any]:
    """The card's YAML front matter as a dict (key order as written)."""
    cfg = manifest.config
    rows = _rows(manifest)
    names = label_names(_distilled(manifest))
    return {
        "license": cfg.get("license") or "other",
        "pretty_name": f"D3HR distilled {cfg.get('data', '')} ({cfg.get('ipc', '')} images per class)",
        "tags": list(TAGS),
        "task_categories": ["image-classification"],
        "size_categories": [next((label for bound, label in _SIZES if rows < bound), "n>1M")],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
        "dataset_info": {
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
                {"name": "class", "dtype": "string"},
            ]
        },
    }


def _md(text: object) -> str:
    """Any text as literal Markdown inline text: HTML-escaped, Markdown punctuation backslash-escaped, one line."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", text)


def _code(text: object) -> str:
    """A value as inline code, safe in a table cell (a backtick in it widens the fence; '|' is escaped)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _score(s: float | None) -> str:
    if s is None:
        return ""
    return "n/a" if math.isnan(float(s)) else f"{float(s):.4f}"


def card_text(manifest: Manifest) -> str:
    """The dataset card: YAML front matter and a Markdown body (a complete README.md)."""
    cfg, status = manifest.config, manifest.status
    distilled = _distilled(manifest)
    rows = _rows(manifest)
    counts, scores = manifest.counts, manifest.scores
    front = yaml.safe_dump(card_metadata(manifest), sort_keys=False, allow_unicode=True, width=1_000_000)
    source = cfg.get("data") if not cfg.get("from_stats") else f"the statistics file {cfg['from_stats']}"
    out = [
        f"---\n{front}---",
        "",
        f"# D3HR distilled set of {_md(source)}",
        "",
        f"{rows} synthetic images, {_md(cfg.get('ipc', ''))} per class, of {len(distilled)} classes, distilled "
        f"from {_code(source)} with the diffusion model {_code(cfg.get('model', ''))} by D3HR: {_PAPER}. "
        "Each image is decoded from a latent of the most representative group drawn from the class's Gaussian "
        "of DDIM-inverted latents.",
        "",
        f"Run status: **{_md(status)}**.",
    ]
    out += [f"- {_md(reason)}" for reason in manifest.reasons]
    if status == "failed" or cfg.get("stats_only"):
        out += ["", f"This output holds no `{DATA_FILE}` (the run wrote none), so it does not load as a dataset yet."]
    out += [
        "",
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder", split="train")  # or the Hub id it is published under',
        'ds.features["label"].names  # the class names, label order',
        "```",
        "",
        f"Columns: `image` (PNG), `label` (the model's class id), `class` (its name). The same rows are in "
        f"`{DATA_FILE}` (pandas, pyarrow, `ray.data.read_parquet`) and as files in `images/<class>/<k>.png`.",
        "",
        "## How it was made",
        "",
        "With d3hr_ray, a D3HR implementation on Ray (versions: "
        + ", ".join(f"{_md(k)} {_md(v)}" for k, v in manifest.versions.items())
        + "): the statistics of each class's inverted latents, then group selection, sampling and decoding. "
        "`manifest.json` holds every setting, the per-stage timings and every skipped input; `report.html` shows "
        "the images.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| data | {_code(cfg.get('data', ''))} |",
        f"| model | {_code(cfg.get('model', ''))} |",
    ]
    out += [f"| {k} | {_code(cfg[k])} |" for k in _SETTINGS if cfg.get(k) is not None]
    out += [
        "",
        "## Classes",
        "",
        f"{len(distilled)} classes distilled; inputs read, used for the statistics and skipped, and the chosen "
        "group's score (lower is more representative).",
        "",
        "| label | class | read | used | skipped | score |",
        "|---|---|---|---|---|---|",
    ]
    for c, name in sorted(distilled.items()):
        n: Mapping[str, object] = counts.get(name) or {}
        out.append(
            f"| {c} | {_md(name)} | {n.get('read', '')} | {n.get('used', '')} | {n.get('skipped', '')} "
            f"| {_score(scores.get(name))} |"
        )
    undistilled = manifest.undistilled
    if undistilled:
        out += ["", "Not distilled:", ""] + [f"- {_md(name)}: {_md(why)}" for name, why in undistilled.items()]
    out += [
        "",
        "## License",
        "",
        f"Declared as `{_md(cfg.get('license') or 'other')}` (the `--license` flag). The images derive from the "
        "source data and the diffusion model: their licenses apply to this set too.",
        "",
        "## Publish it",
        "",
        "```python",
        "from huggingface_hub import create_repo, upload_folder",
        "",
        'create_repo("you/name", repo_type="dataset", exist_ok=True)  # after `hf auth login` (or HF_TOKEN)',
        'upload_folder(repo_id="you/name", repo_type="dataset", folder_path="path/to/this/folder",',
        '              ignore_patterns=["_state/*", "mlflow.json"])  # the resume state stays here',
        "```",
        "",
        "The Hub reads this card's metadata: the dataset viewer shows the images with their class names, and "
        '`load_dataset("you/name")` returns the same rows.',
        "",
    ]
    return "\n".join(out)


def write_card(out: OutputDir, manifest: Manifest) -> str:
    """README.md into `out` from the run's manifest; its location."""
    return out.write_bytes(CARD_FILE, card_text(manifest).encode("utf-8"))
