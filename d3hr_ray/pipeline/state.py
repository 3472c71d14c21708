"""A run's finished work under `<output>/_state/`: what makes a killed or preempted job resumable.

    _state/run.json                      the keys the results depend on (checked by every rerun)
    _state/shards/<shard id>.safetensors partial class statistics of one input shard, + read counts, skips
    _state/classes/<class id>.safetensors one class's selected latents, PNGs and score (+ the input keys
                                         of real images chosen by --candidates-from real)
    _state/latents/<shard id>.safetensors with --keep-latents: the shard's inverted z_K (float16), labels, keys

Each file is written atomically (`OutputDir`), so its presence is its completion marker: a file is
either whole or absent, never half-written. A rerun of the same command reuses every shard and class
file it finds and computes only the rest; the final outputs are assembled from these files in a fixed
order (shard id, class id), so they do not depend on which run, worker or order produced them.

Memory: one shard's or one class's file at a time on the driver (sparse statistics: the classes
present in the shard only, so O(D) for a class-aligned ImageFolder shard).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from d3hr_ray.io.fs import OutputDir

__all__ = ["STATE_DIR", "RunState", "StateMismatch", "config_diff"]

STATE_DIR = "_state"
_VERSION = 1
# Parallel reads of state files when assembling (S3 GETs are latency-bound).
_READERS = 16


class StateMismatch(ValueError):
    """The output holds a run whose results depend on other settings; the message names the keys."""


def config_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two flat dicts (missing counts as different), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _pack(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: json.dumps(v) for k, v in meta.items()})


def _unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load

    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = {k: json.loads(v) for k, v in (header.get("__metadata__") or {}).items()}
    return load(blob), meta


class RunState:
    """The `_state/` folder of one output."""

    def __init__(self, out: OutputDir):
        self.out = out

    # -- the run's identity -------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([STATE_DIR, *parts])

    def load_run(self) -> dict | None:
        try:
            return json.loads(self.out.read(self._path("run.json")))
        except FileNotFoundError:
            return None

    def begin(self, stats_key: dict, listing: dict | None, generate_key: dict | None) -> dict:
        """Check the settings against a previous run on this output and record them.

        Args:
            stats_key: everything the statistics depend on (model, data, steps, K, guidance, seed, encode, ...).
            listing: the input's fingerprint (classes and their counts), None with --from-stats.
            generate_key: everything the distilled set depends on besides the statistics, or None for
                --stats-only (a later full run adds it).
        Returns:
            {"resumed": bool}: whether earlier work on this output is reused.
        Raises:
            StateMismatch: naming the keys that differ, with how to start over.
        """
        old = self.load_run()
        if old is not None and old.get("version") != _VERSION:
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
        record = {
            "version": _VERSION,
            "stats": stats_key,
            "listing": listing if listing is not None else (old or {}).get("listing"),
            "generate": generate_key if generate_key is not None else (old or {}).get("generate"),
        }
        if record != old:
            self.out.write_bytes(self._path("run.json"), (json.dumps(record, indent=2) + "\n").encode())
        return {"resumed": old is not None}

    # -- statistics shards --------------------------------------------------------------------
    def _ids(self, folder: str) -> set[int]:
        return {int(n.split(".")[0]) for n in self.out.list(self._path(folder)) if n.endswith(".safetensors")}

    def finished_shards(self) -> set[int]:
        return self._ids("shards")

    def write_shard(self, shard_id: int, partial: dict[str, torch.Tensor], read: dict[int, int], skipped: list) -> None:
        """One shard's sparse partial statistics ({classes, count, mean, m2}), read counts and skipped inputs."""
        meta = {"read": {str(c): int(n) for c, n in read.items()}, "skipped": skipped}
        self.out.write_bytes(self._path("shards", f"{shard_id:06d}.safetensors"), _pack(partial, meta))

    def read_shard(self, shard_id: int) -> tuple[dict[str, torch.Tensor], dict[int, int], list]:
        tensors, meta = _unpack(self.out.read(self._path("shards", f"{shard_id:06d}.safetensors")))
        return tensors, {int(c): n for c, n in meta["read"].items()}, meta["skipped"]

    def iter_shards(self, ids: list[int]) -> Iterator[tuple[int, tuple]]:
        """(id, read_shard(id)) in the order of `ids`, fetched a few at a time in parallel."""
        return _in_order(self.read_shard, ids)

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


def _in_order(read, ids: list[int]) -> Iterator[tuple[int, tuple]]:
    """(id, read(id)) in the order of `ids`; _READERS reads in flight, so memory is one chunk of files."""
    with ThreadPoolExecutor(_READERS) as pool:
        for start in range(0, len(ids), _READERS):
            chunk = ids[start : start + _READERS]
            yield from zip(chunk, pool.map(read, chunk), strict=True)
