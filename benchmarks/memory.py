"""Memory as the data grows: the distill job on synthetic Parquet of N tiny images, peak RSS per process.

For each --images N: writes a Parquet data set of N random 8x8 PNGs in 10 classes (row groups of
1,000, the Hugging Face image layout), saves a tiny random DiT pipeline, and runs
`python -m d3hr_ray.distill` on them in its own process, joined to one local Ray instance through
RAY_ADDRESS (as under `ray job submit`). While it runs, every second:

- the peak RSS (VmHWM in /proc/<pid>/status: Linux) of the driver and of every Ray worker process,
  grouped by its process title (ray::EncodeInvertStats, ray::GenerateClasses, ray::MapBatches(...));
- the object store's bytes in use (the raylet's store statistics), and the bytes spilled.

Then it counts the state files (_state/shards, _state/classes). Memory is flat when the peaks do
not grow with N; the work and the state files do. Writes JSON (--json) and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from d3hr_ray.models.build import build_pipeline

_NUM_CLASSES = 10
_SIDE = 8
_ROW_GROUP = 1000
_JOB_FLAGS = ["--steps", "4", "--inversion-step", "2", "--ipc", "2", "--candidates", "200", "--encode", "mean"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000], help="data set sizes to run")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="the job's --batch-size")
    p.add_argument("--json", default=None, help="write the results here")


def _write_parquet(path: Path, n: int, seed: int = 0) -> None:
    """n random (8, 8, 3) PNG images with labels i % 10, in row groups of 1,000."""
    names = [f"class_{i}" for i in range(_NUM_CLASSES)]
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
        metadata={b"huggingface": json.dumps(meta).encode()},
    )
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, _ROW_GROUP):
            rows = range(start, min(start + _ROW_GROUP, n))
            images = []
            for _ in rows:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (_SIDE, _SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": None})
            writer.write_table(pa.table({"image": images, "label": [i % _NUM_CLASSES for i in rows]}, schema=schema))


def _status(pid: int, key: str) -> int | None:
    """A size field of /proc/<pid>/status in bytes, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.M)
    return int(m.group(1)) * 1024 if m else None


def _peak_rss(pid: int) -> int | None:
    """VmHWM: the peak resident set of a process in bytes (shared pages included: a Ray worker's RSS
    counts the object-store pages it has read), or None if it is gone."""
    return _status(pid, "VmHWM")


def _private_rss(pid: int) -> int | None:
    """RssAnon: the process's own (anonymous) resident memory now, without shared object-store pages."""
    return _status(pid, "RssAnon")


def _proc(pid: str, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _ray_processes(session_dir: str) -> dict[int, str]:
    """pid -> process title ('ray::EncodeInvertStats', ...) of the worker processes of *this* Ray instance.

    Workers are children of the instance's raylet, found by the session folder on its command line (so
    other Ray instances on the machine are left out).
    """
    pids = [d.name for d in Path("/proc").iterdir() if d.name.isdigit()]
    raylets = {p for p in pids if "raylet" in _proc(p, "cmdline").split("\0")[0] and session_dir in _proc(p, "cmdline")}
    out = {}
    for p in pids:
        m = re.search(r"^PPid:\s+(\d+)", _proc(p, "status"), flags=re.M)
        if m and m.group(1) in raylets:
            title = _proc(p, "cmdline").split("\0")[0]
            if title.startswith("ray::"):
                # 'ray::MapWorker(MapBatches(EncodeInvertStats)).submit' -> the actor, whatever method runs
                out[int(p)] = re.sub(r"\.[A-Za-z_]\w*$", "", title.split(" ")[0])
    return out


def _store_bytes(gcs_address: str) -> tuple[int, int]:
    """(object store bytes in use, bytes spilled so far), summed over the cluster."""
    reply = get_memory_info_reply(get_state_from_address(gcs_address))
    return int(reply.store_stats.object_store_bytes_used), int(reply.store_stats.spilled_bytes_total)


def _one(n: int, tmp: Path, model: Path, env: dict, gcs: str, session: str, batch_size: int) -> dict:
    data = tmp / f"data{n}.parquet"
    _write_parquet(data, n)
    out = tmp / f"out{n}"
    cmd = [
        sys.executable,
        "-m",
        "d3hr_ray.distill",
        "--data",
        str(data),
        "--model",
        str(model),
        "--output",
        str(out),
        "--batch-size",
        str(batch_size),
        *_JOB_FLAGS,
    ]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = 0
    workers: dict[str, int] = {}
    private: dict[str, int] = {}
    store = spilled = 0
    while proc.poll() is None:
        driver = max(driver, _peak_rss(proc.pid) or 0)
        for pid, title in _ray_processes(session).items():
            if title != "ray::IDLE":  # a worker between tasks; its peak is counted under its task's title
                workers[title] = max(workers.get(title, 0), _peak_rss(pid) or 0)
                private[title] = max(private.get(title, 0), _private_rss(pid) or 0)
        used, spilled = _store_bytes(gcs)
        store = max(store, used)
        time.sleep(1.0)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed on {n} images: {proc.stderr.read()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "images": n,
        "wall_s": round(wall, 1),
        "driver_peak_rss": driver,
        "worker_peak_rss": dict(sorted(workers.items())),
        "worker_peak_private": dict(sorted(private.items())),
        "object_store_peak": store,
        "spilled": spilled,
        "state_files": {
            "shards": len(list((out / "_state" / "shards").glob("*.safetensors"))),
            "classes": len(list((out / "_state" / "classes").glob("*.safetensors"))),
        },
        "used": sum(v["used"] for v in manifest["counts"].values()),
    }


def run(args: argparse.Namespace) -> int:
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    gcs = ray.get_runtime_context().gcs_address
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    env = dict(os.environ, RAY_ADDRESS=gcs)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model"
            build_pipeline(
                dit="tiny",
                vae="tiny",
                num_classes=_NUM_CLASSES,
                resolution=_SIDE,
                class_names=[f"class_{i}" for i in range(_NUM_CLASSES)],
            ).save_pretrained(model)
            for n in args.images:
                results.append(_one(n, Path(tmp), model, env, gcs, session, args.batch_size))
                print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()
    mib = 1024 * 1024
    titles = sorted({t for r in results for t in r["worker_peak_rss"] if "MapBatches" in t})
    print(
        "| images | wall s | driver MiB | "
        + " | ".join(f"{t} peak (private) MiB" for t in titles)
        + " | store peak MiB | spilled MiB | shard files | class files |"
    )
    print("|---" * (7 + len(titles)) + "|")
    for r in results:
        cells = [
            f"{r['worker_peak_rss'].get(t, 0) / mib:.0f} ({r['worker_peak_private'].get(t, 0) / mib:.0f})"
            for t in titles
        ]
        print(
            f"| {r['images']:,} | {r['wall_s']} | {r['driver_peak_rss'] / mib:.0f} | "
            + " | ".join(cells)
            + f" | {r['object_store_peak'] / mib:.1f} | {r['spilled'] / mib:.1f} | {r['state_files']['shards']} | "
            f"{r['state_files']['classes']} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"results": results, "torch": torch.__version__, "ray": ray.__version__, "flags": _JOB_FLAGS}, indent=2
            )
        )
    return 0
