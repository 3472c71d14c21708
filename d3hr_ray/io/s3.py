"""s3:// helpers: parse URLs, mirror a prefix into a local cache keyed by the objects' ETags.

The endpoint comes from boto3's own configuration (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, profiles,
instance roles), so MinIO, moto and other S3-compatible stores work without flags of ours.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

__all__ = ["default_cache_dir", "is_s3", "list_objects", "mirror_prefix", "parse_s3_url", "s3_client"]


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """ "s3://bucket/a/b" -> ("bucket", "a/b") (no leading or trailing slash on the prefix)."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL has no bucket: {url!r}")
    return bucket, prefix.strip("/")


def s3_client():
    import boto3

    return boto3.client("s3")


def list_objects(client, bucket: str, prefix: str) -> list[dict]:
    """All objects under `prefix/` (or the whole bucket for an empty prefix): dicts with Key, ETag, Size."""
    base = f"{prefix}/" if prefix else ""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        out.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    return out


def default_cache_dir() -> Path:
    """$D3HR_CACHE_DIR, else ~/.cache/d3hr_ray."""
    return Path(os.environ.get("D3HR_CACHE_DIR", Path.home() / ".cache" / "d3hr_ray"))


def mirror_prefix(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download every object under an s3:// prefix into a local folder and return it.

    The folder's name is a hash of the URL and of every object's (key, ETag, size), so an unchanged
    prefix is fetched once and a changed object (new ETag) is fetched again into a new folder. The
    download goes to a temporary folder renamed into place when complete, so an interrupted fetch is
    never mistaken for a model.

    Raises:
        FileNotFoundError: nothing under the prefix.
    """
    bucket, prefix = parse_s3_url(url)
    client = s3_client()
    objects = sorted(list_objects(client, bucket, prefix), key=lambda o: o["Key"])
    if not objects:
        raise FileNotFoundError(f"no objects under {url}")
    h = hashlib.sha256(f"s3://{bucket}/{prefix}".encode())  # normalised: a trailing slash is the same prefix
    for o in objects:
        h.update(f"\n{o['Key']}\t{o['ETag']}\t{o['Size']}".encode())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "s3"
    dest = root / h.hexdigest()[:24]
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        base = len(prefix) + 1 if prefix else 0
        for o in objects:
            target = tmp / o["Key"][base:]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, o["Key"], str(target))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent fetch of the same objects that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
