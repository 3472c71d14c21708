"""S3 requests a sample: listing and reading each input kind on a local S3 server, counted at the server.

Starts moto's S3 server (`d3hr_ray.storage.local_s3`, as tests/conftest.py does) behind a small counting HTTP
proxy written here, points the product at the proxy (AWS_ENDPOINT_URL), writes small synthetic data sets of each
kind straight to moto, then:

- listing: `source_kind` + `list_source`, as the distill job's driver calls them (size probe included);
- reading: every shard of the listing through the product's own shard reader (`sources.read_shard`).

Requests and bytes are counted per HTTP method for each phase. The projection multiplies the listing's
requests a sample by ImageNet-1K's 1,281,167 images at --rtt-ms a request, one after another (the listing's
requests are made in series on the driver unless the kind's lister says otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from d3hr_ray.data.sources import list_source, read_shard, source_kind
from d3hr_ray.storage.local_s3 import local_s3_server

IMAGENET_1K = 1_281_167
_NUM_CLASSES = 10
_SIDE = 8
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
KINDS = ("webdataset", "parquet", "imagefolder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="input kinds to measure")
    p.add_argument("--tars", type=int, default=4, help="WebDataset tars (and Parquet files)")
    p.add_argument("--per-tar", type=int, default=1000, help="samples a tar (rows a Parquet file)")
    p.add_argument("--row-group", type=int, default=250, help="Parquet rows a row group")
    p.add_argument("--folders", type=int, default=10, help="ImageFolder class folders")
    p.add_argument("--per-folder", type=int, default=50, help="ImageFolder images a folder (one GET each to read)")
    p.add_argument("--shard-size", type=int, default=1024, help="the listing's shard_size (the job's --shard-size)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="S3 round trip for the projection")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


# -- the counting proxy ------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """Requests and bytes (request body + response body) per HTTP method."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


class CountingProxy:
    """A forwarding HTTP/1.1 proxy in front of `upstream` (host, port) that counts what passes, by phase.

    Requests are forwarded byte for byte with their own Host header (so signatures stay valid); responses come
    back whole with their Content-Length. `phase(name)` makes every request until the next phase count under
    `name`, whichever thread (the product's or pyarrow's) makes it.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.counts: dict[str, Counts] = {}
        self.log: list[tuple[str, str, str]] = []  # (phase, method, path and query) of every request, in order
        self._phase = "setup"
        self._lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                resp, data = proxy._upstream(self.command, self.path, body, headers)
                proxy._count(self.command, self.path, (n or 0) + len(data))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _upstream(self, method: str, path: str, body, headers) -> tuple[http.client.HTTPResponse, bytes]:
        """One request to the upstream server on this thread's kept-alive connection (a new one if it closed)."""
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None) or http.client.HTTPConnection(*self.upstream, timeout=60)
            self._local.conn = conn
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp, resp.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _count(self, method: str, path: str, nbytes: int) -> None:
        with self._lock:
            self.log.append((self._phase, method, path))
            c = self.counts.setdefault(self._phase, Counts())
            c.requests[method] = c.requests.get(method, 0) + 1
            c.bytes[method] = c.bytes.get(method, 0) + nbytes

    def phase(self, name: str) -> Counts:
        with self._lock:
            self._phase = name
            return self.counts.setdefault(name, Counts())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def s3_behind_proxy() -> Iterator[tuple[str, CountingProxy]]:
    """(moto's endpoint URL, the counting proxy in front of it); the environment points boto3 and pyarrow at the
    proxy, with test credentials, until the block ends."""
    with local_s3_server() as moto_url:
        proxy = CountingProxy(("127.0.0.1", int(moto_url.rsplit(":", 1)[1])))
        try:
            with mock.patch.dict(os.environ, {**_CREDENTIALS, "AWS_ENDPOINT_URL": proxy.url}):  # restored after
                os.environ.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over AWS_ENDPOINT_URL
                yield moto_url, proxy
        finally:
            proxy.close()


# -- synthetic data sets ------------------------------------------------------------------------------------------


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (_SIDE, _SIDE, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_webdataset(put, prefix: str, tars: int, per_tar: int, rng) -> int:
    """`tars` tars of `per_tar` samples (png + cls, labels i % 10) and a classes.txt; returns the samples."""
    for t in range(tars):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for i in range(per_tar):
                for ext, data in (("png", _png(rng)), ("cls", str((t * per_tar + i) % _NUM_CLASSES).encode())):
                    info = tarfile.TarInfo(f"s{t:03d}{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        put(f"{prefix}/shard-{t:06d}.tar", buf.getvalue())
    put(f"{prefix}/classes.txt", "".join(f"class_{c}\n" for c in range(_NUM_CLASSES)).encode())
    return tars * per_tar


def write_parquet(put, prefix: str, files: int, rows: int, row_group: int, rng) -> int:
    """`files` Parquet files of `rows` rows (HF image struct + int label), row groups of `row_group`."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for f in range(files):
        images = [{"bytes": _png(rng), "path": f"{i}.png"} for i in range(rows)]
        labels = [(f * rows + i) % _NUM_CLASSES for i in range(rows)]
        table = pa.table({"image": pa.array(images, image), "label": pa.array(labels, pa.int64())})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group)
        put(f"{prefix}/part-{f:05d}.parquet", buf.getvalue())
    return files * rows


def write_imagefolder(put, prefix: str, folders: int, per_folder: int, rng) -> int:
    """`folders` class folders of `per_folder` PNGs."""
    for c in range(folders):
        for i in range(per_folder):
            put(f"{prefix}/class_{c}/{i:05d}.png", _png(rng))
    return folders * per_folder


# -- the measurement ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    kind: str
    samples: int
    shards: int
    listing: dict  # Counts as a dict: {"requests": {method: n}, "bytes": {method: n}}
    reading: dict
    listing_requests: int
    reading_requests: int
    listing_per_sample: float
    reading_per_sample: float
    seconds_listing: float
    seconds_reading: float


def measure(args: argparse.Namespace) -> list[Row]:
    """Write each kind's data set to a fresh moto server, then list and read it through the counting proxy."""
    rows = []
    with s3_behind_proxy() as (moto_url, proxy):
        direct = boto3.client("s3", endpoint_url=moto_url)  # setup goes straight to moto, uncounted
        direct.create_bucket(Bucket="bench")

        def put(key: str, data: bytes) -> None:
            direct.put_object(Bucket="bench", Key=key, Body=data)

        rng = np.random.default_rng(0)
        for kind in args.kinds:
            if kind == "webdataset":
                n = write_webdataset(put, kind, args.tars, args.per_tar, rng)
            elif kind == "parquet":
                n = write_parquet(put, kind, args.tars, args.per_tar, args.row_group, rng)
            else:
                n = write_imagefolder(put, kind, args.folders, args.per_folder, rng)
            uri = f"s3://bench/{kind}"
            listing_counts = proxy.phase(f"{kind}/listing")
            t0 = time.perf_counter()
            found = source_kind(uri)
            if found != kind:
                raise RuntimeError(f"{uri}: detected as {found}, written as {kind}")
            listing = list_source(uri, model_names=None, num_model_classes=None, shard_size=args.shard_size)
            t1 = time.perf_counter()
            reading_counts = proxy.phase(f"{kind}/reading")
            read = sum(1 for s in listing.shards for _ in read_shard(s))
            t2 = time.perf_counter()
            proxy.phase("setup")
            if read != n or sum(listing.counts.values()) != n:
                raise RuntimeError(f"{kind}: wrote {n} samples, listed {sum(listing.counts.values())}, read {read}")
            rows.append(
                Row(
                    kind=kind,
                    samples=n,
                    shards=len(listing.shards),
                    listing=asdict(listing_counts),
                    reading=asdict(reading_counts),
                    listing_requests=listing_counts.total,
                    reading_requests=reading_counts.total,
                    listing_per_sample=listing_counts.total / n,
                    reading_per_sample=reading_counts.total / n,
                    seconds_listing=t1 - t0,
                    seconds_reading=t2 - t1,
                )
            )
    return rows


def _methods(c: dict) -> str:
    return ", ".join(f"{m} {k}" for m, k in sorted(c["requests"].items()))


def _mb(c: dict) -> str:
    return f"{sum(c['bytes'].values()) / 1e6:.2f}"


def run(args: argparse.Namespace) -> int:
    import moto  # a test extra (the server's): for its version only, where the bench runs

    rows = measure(args)
    print(
        f"# S3 requests, counted at moto's server ({os.cpu_count()} CPUs; ray {ray.__version__}, pyarrow "
        f"{pa.__version__}, boto3 {boto3.__version__}, moto {moto.__version__}); projection at "
        f"{args.rtt_ms:g} ms a request, in series"
    )
    print(
        "| kind | samples | shards | listing requests (by method) | listing MB | listing req/sample | reading requests "
        "(by method) | reading MB | reading req/sample | listing + reading req/sample | ImageNet-1K listing, "
        "projected |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hours = r.listing_per_sample * IMAGENET_1K * args.rtt_ms / 1000 / 3600
        print(
            f"| {r.kind} | {r.samples:,} | {r.shards} | {r.listing_requests} ({_methods(r.listing)}) | "
            f"{_mb(r.listing)} | {r.listing_per_sample:.4f} | {r.reading_requests} ({_methods(r.reading)}) | "
            f"{_mb(r.reading)} | {r.reading_per_sample:.4f} | "
            f"{r.listing_per_sample + r.reading_per_sample:.4f} | {_duration(hours)} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"
