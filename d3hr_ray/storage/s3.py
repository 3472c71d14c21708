"""s3:// helpers: parse URLs, mirror a prefix into a local cache keyed by the objects' ETags, and say in one
line what went wrong when S3 refuses (`explained`).

The endpoint comes from boto3's own configuration (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, profiles,
instance roles), so MinIO, moto and other S3-compatible stores work without flags of ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type stubs (boto3-stubs is not a dependency)
from botocore import exceptions as bx

__all__ = [
    "S3Error",
    "default_cache_dir",
    "explain_s3_error",
    "explained",
    "is_s3",
    "list_objects",
    "mirror_prefix",
    "parse_s3_url",
    "s3_client",
    "shared_client",
]

# botocore's error codes and pyarrow's messages (its AWS SDK's error names, or the HTTP status) for each fault.
_DENIED = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "403",
    "Forbidden",
    "ACCESS_DENIED",
    "HTTP status 403",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
)
_NO_BUCKET = ("NoSuchBucket", "NO_SUCH_BUCKET")
_REGION = (
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "301",
    "HTTP status 301",
    "PERMANENT_REDIRECT",
)
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "Couldn't connect",
    "curlCode",
    "Could not connect",
    "Failed to connect",
    "Connection refused",
    "Could not resolve host",
)
_NO_CREDENTIALS = (
    "Unable to locate credentials",
    "unable to sign request without credentials",
    "No credentials",
    "MissingAuthenticationToken",
)


class S3Error(OSError):
    """An S3 request refused for a reason the user can fix; the message is one line naming the URI and the fix."""


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


# A boto3 S3 client: boto3 builds its classes at run time and ships no types, so there is nothing to name.
S3Client = Any


def s3_client() -> S3Client:
    return boto3.client("s3")


def shared_client() -> S3Client:
    """One boto3 S3 client a process for many small requests (clients are thread-safe; making one costs tens of
    milliseconds), made again when the endpoint or region in the environment changes."""
    key = tuple(os.environ.get(k) for k in _CLIENT_ENV)
    if _shared.get("key") != key or "client" not in _shared:
        _shared.update(key=key, client=s3_client())
    return _shared["client"]


# What a boto3 client's configuration is read from, here (a change makes `shared_client` a new client).
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
)
_shared: dict[str, Any] = {}


def list_objects(client: S3Client, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """All objects under `prefix/` (or the whole bucket for an empty prefix): dicts with Key, ETag, Size."""
    base = f"{prefix}/" if prefix else ""
    out: list[dict[str, Any]] = []
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


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's S3 endpoint"


def explain_s3_error(uri: str, error: BaseException) -> str | None:
    """One line saying what went wrong on `uri` and what to do, for the S3 faults a user can fix (no credentials,
    no such bucket, access denied, another region, an unreachable endpoint); None for any other error.

    Reads botocore's exceptions and error codes, and pyarrow's S3 messages (its AWS SDK's error names).
    """
    bucket = uri[len("s3://") :].split("/", 1)[0] if is_s3(uri) else uri
    codes: list[str] = []
    region = None
    if isinstance(error, bx.ClientError):
        err = error.response.get("Error", {})
        meta = error.response.get("ResponseMetadata", {})
        codes = [str(err.get("Code", "")), str(meta.get("HTTPStatusCode", ""))]
        region = err.get("Region") or (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region")
    text = " ".join([*codes, str(error)])
    if isinstance(error, bx.NoCredentialsError | bx.PartialCredentialsError) or any(c in text for c in _NO_CREDENTIALS):
        return (
            f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run "
            "where an instance role (IRSA on Kubernetes) provides them"
        )
    if isinstance(error, bx.EndpointConnectionError | bx.ConnectTimeoutError) or any(c in text for c in _UNREACHABLE):
        return f"{uri}: cannot reach {_endpoint()}: check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network"
    if any(c in codes or c in text for c in _NO_BUCKET):
        return (
            f"{uri}: the bucket {bucket!r} does not exist: check its name (and AWS_ENDPOINT_URL for an "
            "S3-compatible store)"
        )
    if any(c in codes or c in text for c in _REGION):
        where = f" ({region})" if region else ""
        return f"{uri}: the bucket {bucket!r} is in another region{where}: set AWS_REGION={region or '<its region>'}"
    if any(c in codes or c in text for c in _DENIED):
        return (
            f"{uri}: access denied: the credentials in use may not read or write it; check the bucket's policy, the "
            "IAM role and AWS_PROFILE"
        )
    return None


@contextlib.contextmanager
def explained(uri: str) -> Iterator[None]:
    """Run S3 work on `uri`; a fault the user can fix comes out as one-line `S3Error` (an OSError), the rest as is."""
    if not is_s3(uri):
        yield
        return
    try:
        yield
    except S3Error:
        raise
    except Exception as e:
        why = explain_s3_error(uri, e)
        if why is None:
            raise
        raise S3Error(why) from None
