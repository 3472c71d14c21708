"""A run's finished work under `<output>/_state/`: what makes a killed or preempted job resumable.

    _state/run.json                      the keys the results depend on (checked by every rerun)
    _state/blocks/<block id>.safetensors the partial class statistics of one block of consecutive shards (merged in
                                         shard id order, artifacts/blocks.py), + read counts, skipped inputs
    _state/classes/<class id>.safetensors one class's selected latents, PNGs and score (+ the input keys
                                         of real images chosen by --candidates-from real)
    _state/latents/<shard id>.safetensors with --keep-latents: the shard's inverted z_K (float16), labels, keys

Each file is written atomically (`OutputDir`), so its presence is its completion marker: a file is
either whole or absent, never half-written. A rerun of the same command reuses every shard and class
file it finds and computes only the rest; the final outputs are assembled from these files in a fixed
order (block id, class id), so they do not depend on which run, worker or order produced them.

Memory: a few block or class files at a time on the driver (sparse statistics: the classes present in
the block only). State written by version 1 (a file a shard under `_state/shards/`) resumes as blocks of
one shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load, save

from d3hr_ray.config import DistillConfig
from d3hr_ray.data.sources import read_class_map
from d3hr_ray.storage.fs import OutputDir, open_ranged, resolve

__all__ = ["STATE_DIR", "RunState", "StateMismatch", "config_diff", "run_keys"]

T = TypeVar("T")

STATE_DIR = "_state"
_VERSION = 2
# Versions whose state this one resumes: 1 kept a file a shard (_state/shards/), which are blocks of one shard.
_READS = (1, 2)
# Parallel reads of class files when assembling (S3 GETs are latency-bound).
_READERS = 16
# Block files in flight when merging: each may hold every class (C x D x 16 bytes), so one is read while
# the one before it is merged.
_BLOCK_READERS = 2
# Bytes a request of a block file's header (`shard_classes` reads the headers only): the header is a few kB.
_HEADER_READ = 1 << 16


class StateMismatch(ValueError):
    """The output holds a run whose results depend on other settings; the message names the keys."""


def config_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two flat dicts (missing counts as different), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def run_keys(
    cfg: DistillConfig, dtype: str, output_size: int | None, group: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(what the statistics depend on, what the distilled set depends on besides them; None for --stats-only): the
    keys `RunState.begin` checks a rerun against.

    group: the classes a generation call holds. On a GPU a class's images depend at float precision on the group it
    is generated with, so it is part of the key (None when a call holds one class, as every run before groups did).
    """
    stats_key = {
        "model": cfg.model,
        "data": cfg.data,
        "from_stats": cfg.from_stats,
        "classes": sorted(cfg.classes) if cfg.classes else None,
        "steps": cfg.steps,
        "inversion_step": cfg.inversion_step,
        "guidance": cfg.guidance,
        "encode": cfg.encode,
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "dtype": dtype,
        "stats_per_class": cfg.stats_per_class,
        "class_names": cfg.class_names,
        "class_map": read_class_map(cfg.class_map),  # its content: the same file edited maps classes elsewhere
    }
    if cfg.stats_only:
        return stats_key, None
    return stats_key, {
        "ipc": cfg.ipc,
        "candidates": cfg.candidates,
        "score_weights": list(cfg.score_weights),
        "latents": cfg.latents,
        "start_step": cfg.generation_start,
        "output_size": output_size,
        "candidates_from": None if cfg.candidates_from == "gaussian" else cfg.candidates_from,
        "classes_per_call": None if group == 1 else group,
    }


def _pack(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: json.dumps(v) for k, v in meta.items()})


def _unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    n = int.from_bytes(blob[:8], "little")
    return load(blob), _metadata(blob[8 : 8 + n])


def _metadata(header: bytes) -> dict:
    """A safetensors header (the JSON after its 8-byte length) -> its metadata, each value JSON-decoded."""
    return {k: json.loads(v) for k, v in (json.loads(header).get("__metadata__") or {}).items()}


class RunState:
    """The `_state/` folder of one output."""

    def __init__(self, out: OutputDir):
        self.out = out
        self.block = 1  # shards a statistics block (set by `begin`)
        self._blocks_dir = "blocks"

    # -- the run's identity -------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([STATE_DIR, *parts])

    def load_run(self) -> dict | None:
        """The recorded run.json, or None; a recorded run's block size and layout become this RunState's."""
        try:
            record = json.loads(self.out.read(self._path("run.json")))
        except FileNotFoundError:
            return None
        if record.get("version") == 1:
            self.block, self._blocks_dir = 1, "shards"
        elif "block" in record:
            self.block = int(record["block"])
        return record

    def begin(self, stats_key: dict, listing: dict | None, generate_key: dict | None, block: int = 1) -> dict:
        """Check the settings against a previous run on this output and record them.

        Args:
            stats_key: everything the statistics depend on (model, data, steps, K, guidance, seed, encode, ...).
            listing: the input's fingerprint (classes and their counts), None with --from-stats.
            generate_key: everything the distilled set depends on besides the statistics, or None for
                --stats-only (a later full run adds it).
            block: shards a statistics block for a new run (`blocks.block_size`); a resumed run keeps the one it
                recorded (1 for version 1 state), since the statistics' bits depend on it.
        Returns:
            {"resumed": bool, "block": the shards a block this run uses}.
        Raises:
            StateMismatch: naming the keys that differ, with how to start over.
        """
        old = self.load_run()
        if old is not None and old.get("version") not in _READS:
            raise StateMismatch(
                f"{self.out.uri} holds state of another d3hr_ray version; rerun with --overwrite to start over"
            )
        if old is not None:
            diff = config_diff(old["stats"], stats_key)
            if not diff and listing is not None and old.get("listing") not in (None, listing):
                raise StateMismatch(
                    f"--data changed since the run that wrote {self.out.uri} (its classes or their "
                    "image counts differ); rerun with --overwrite to start over"
                )
            if generate_key is not None and old.get("generate") is not None:
                diff = sorted(set(diff) | set(config_diff(old["generate"], generate_key)))  # every key at once
            if diff:
                raise StateMismatch(
                    f"{self.out.uri} holds a run with other settings: {', '.join(diff)} differ; "
                    "use the same settings to resume it, another --output, or --overwrite to start over"
                )
        elif self.out.exists("manifest.json") or self.out.exists("stats.safetensors"):
            raise StateMismatch(
                f"{self.out.uri} holds the outputs of a run with no resumable state; "
                "use another --output, or --overwrite to replace them"
            )
        if old is None:
            self.block = int(block)  # else load_run took the recorded one
        record = {
            "version": old["version"] if old is not None else _VERSION,
            "stats": stats_key,
            "listing": listing if listing is not None else (old or {}).get("listing"),
            "generate": generate_key if generate_key is not None else (old or {}).get("generate"),
        }
        if record["version"] != 1:
            record["block"] = self.block
        if record != old:
            self.out.write_bytes(self._path("run.json"), (json.dumps(record, indent=2) + "\n").encode())
        return {"resumed": old is not None, "block": self.block}

    # -- statistics blocks --------------------------------------------------------------------
    def _ids(self, folder: str) -> set[int]:
        return {int(n.split(".")[0]) for n in self.out.list(self._path(folder)) if n.endswith(".safetensors")}

    def finished_blocks(self) -> set[int]:
        return self._ids(self._blocks_dir)

    def write_block(
        self,
        block: int,
        partial: dict[str, torch.Tensor],
        read: dict[int, int],
        skipped: list,
        shard_classes: dict[int, list[int]] | None = None,
    ) -> None:
        """One block's sparse partial statistics ({classes, count, mean, m2}), read counts, skipped inputs, and the
        classes each of its shards holds (which shards' kept latents a class's real candidates are in)."""
        meta = {"read": {str(c): int(n) for c, n in read.items()}, "skipped": skipped}
        if shard_classes is not None:
            meta["shards"] = {str(s): [int(c) for c in cs] for s, cs in shard_classes.items()}
        self.out.write_bytes(self._path(self._blocks_dir, f"{block:06d}.safetensors"), _pack(partial, meta))

    def shard_classes(self) -> dict[int, list[int]]:
        """Shard id -> the class ids it holds, for every shard of a finished block (a file of version 1 is one
        shard's, named by its id)."""
        out: dict[int, list[int]] = {}
        for block, meta in _in_order(self._read_block_meta, sorted(self.finished_blocks()), _READERS):
            if "shards" in meta:
                out.update({int(s): cs for s, cs in meta["shards"].items()})
            else:  # version 1: a shard's file, its classes a tensor
                out[block] = self._read_block_file(block)[0]["classes"].tolist()
        return out

    def _read_block_meta(self, block: int) -> dict:
        """A block file's metadata alone: its safetensors header (8 bytes of length, then JSON), in a ranged read."""
        fs, path = resolve(self.out.path(self._path(self._blocks_dir, f"{block:06d}.safetensors")))
        with open_ranged(fs, path, _HEADER_READ) as f:
            n = int.from_bytes(f.read(8), "little")
            return _metadata(f.read(n))

    def _read_block_file(self, block: int) -> tuple[dict[str, torch.Tensor], dict]:
        return _unpack(self.out.read(self._path(self._blocks_dir, f"{block:06d}.safetensors")))

    def read_block(self, block: int) -> tuple[dict[str, torch.Tensor], dict[int, int], list]:
        tensors, meta = self._read_block_file(block)
        return tensors, {int(c): n for c, n in meta["read"].items()}, meta["skipped"]

    def iter_blocks(self, ids: list[int]) -> Iterator[tuple[int, tuple]]:
        """(id, read_block(id)) in the order of `ids`, fetched a few at a time in parallel."""
        return _in_order(self.read_block, ids, _BLOCK_READERS)

    # -- kept latents (--keep-latents) --------------------------------------------------------------
    def finished_latents(self) -> set[int]:
        return self._ids("latents")

    def write_latents(self, shard_id: int, latents: torch.Tensor, labels: list[int], keys: list[str]) -> None:
        """One shard's inverted latents z_K (n, D) (stored float16), their class ids and input keys, in shard order."""
        tensors = {"latents": latents.to(torch.float16).contiguous(), "labels": torch.tensor(labels, dtype=torch.int64)}
        self.out.write_bytes(self._path("latents", f"{shard_id:06d}.safetensors"), _pack(tensors, {"keys": keys}))

    def read_latents(self, shard_id: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(latents (n, D) float16, labels (n,) int64, keys) of one shard."""
        tensors, meta = _unpack(self.out.read(self._path("latents", f"{shard_id:06d}.safetensors")))
        return tensors["latents"], tensors["labels"], meta["keys"]

    # -- generated classes --------------------------------------------------------------------
    def finished_classes(self) -> set[int]:
        return self._ids("classes")

    def write_class(
        self, class_id: int, latents: np.ndarray, pngs: list[bytes], score: float, keys: list[str] | None = None
    ) -> None:
        """latents: (IPC, D) float32; pngs: IPC encoded images; score: the group's score (NaN for noise latents);
        keys: the input keys of the images when they are real ones (--candidates-from real)."""
        offsets = np.cumsum([0, *map(len, pngs)]).astype(np.int64)
        blob = np.frombuffer(b"".join(pngs), dtype=np.uint8).copy()
        tensors = {
            "latents": torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)),
            "png": torch.from_numpy(blob),
            "offsets": torch.from_numpy(offsets),
        }
        meta = {"score": repr(float(score))} if keys is None else {"score": repr(float(score)), "keys": list(keys)}
        self.out.write_bytes(self._path("classes", f"{class_id:06d}.safetensors"), _pack(tensors, meta))

    def read_class(self, class_id: int) -> tuple[np.ndarray, list[bytes], float]:
        tensors, meta = _unpack(self.out.read(self._path("classes", f"{class_id:06d}.safetensors")))
        blob, off = tensors["png"].numpy().tobytes(), tensors["offsets"].tolist()
        return (
            tensors["latents"].numpy(),
            [blob[a:b] for a, b in zip(off[:-1], off[1:], strict=True)],
            float(meta["score"]),
        )

    def class_keys(self, class_id: int) -> list[str] | None:
        """The input keys of a class's images when they are real ones (--candidates-from real), else None."""
        return _unpack(self.out.read(self._path("classes", f"{class_id:06d}.safetensors")))[1].get("keys")

    def iter_classes(self, ids: list[int]) -> Iterator[tuple[int, tuple]]:
        """(id, read_class(id)) in the order of `ids`, fetched a few at a time in parallel."""
        return _in_order(self.read_class, ids)


def _in_order(read: Callable[[int], T], ids: list[int], readers: int = _READERS) -> Iterator[tuple[int, T]]:
    """(id, read(id)) in the order of `ids`; `readers` reads in flight, so memory is one chunk of files."""
    with ThreadPoolExecutor(readers) as pool:
        for start in range(0, len(ids), readers):
            chunk = ids[start : start + readers]
            yield from zip(chunk, pool.map(read, chunk), strict=True)
