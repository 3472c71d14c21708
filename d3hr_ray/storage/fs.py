"""Local paths and s3:// URIs behind one interface: pyarrow filesystems for reading, atomic writes.

S3 requests are round trips of tens of milliseconds, so readers fetch in large ranges: `open_ranged` reads
READ_BLOCK bytes a request whatever the caller asks for (a tar header, a label), and `read_object` reads a
whole small object in one GET.

S3 endpoints and credentials come from the environment as boto3 reads them (AWS_ENDPOINT_URL,
AWS_ENDPOINT_URL_S3, AWS_REGION / AWS_DEFAULT_REGION, keys, profiles, instance roles), for pyarrow too.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

from d3hr_ray.storage.s3 import explained, is_s3, list_objects, parse_s3_url, s3_client, shared_client

__all__ = ["READ_BLOCK", "OutputDir", "open_ranged", "read_bytes", "read_object", "resolve"]

# Bytes a ranged reader fetches a request (at least): 8 MiB, about 70 ImageNet JPEGs and their labels.
READ_BLOCK = 8 * 2**20


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kw: dict[str, str] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or an s3:// URI."""
    if is_s3(uri):
        bucket, key = parse_s3_url(uri)
        return _s3_filesystem(), posixpath.join(bucket, key) if key else bucket
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def read_bytes(uri: str) -> bytes:
    """A whole file, local or s3://. Raises FileNotFoundError naming it."""
    if is_s3(uri):
        bucket, key = parse_s3_url(uri)
        with explained(uri):
            client = s3_client()
            try:
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:
                raise FileNotFoundError(f"{uri} does not exist") from None
    p = Path(uri).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{uri} does not exist")
    return p.read_bytes()


class _Ranges(io.RawIOBase):
    """Reads at any offset of one pyarrow random-access file: each `readinto` is one `read_at` (a ranged GET)."""

    def __init__(self, f: pa.NativeFile):
        self._f, self._pos, self._size = f, 0, f.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        if target < 0:
            raise OSError(f"negative seek position {target}")
        self._pos = target
        return target

    def readinto(self, b: Any) -> int:  # a writable buffer (bytearray, memoryview)
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = self._f.read_at(n, self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_ranged(fs: pafs.FileSystem, path: str, block: int = READ_BLOCK) -> io.BufferedReader[_Ranges]:
    """A seekable binary reader of `path` (in pyarrow filesystem `fs`) that fetches `block` bytes a request.

    Reads and seeks inside the buffered block cost nothing; a read past it fetches the next `block` bytes from
    where it starts (one ranged GET on S3), so small reads spread over a file cost size / block requests plus
    one per forward seek that skips more than a block. Opening costs one request (the object's size);
    `.raw.size()` is it.
    """
    return io.BufferedReader(_Ranges(fs.open_input_file(path)), buffer_size=block)


def read_object(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file of pyarrow filesystem `fs`: one GET on S3 (no size request), a plain read locally."""
    if isinstance(fs, pafs.S3FileSystem):
        bucket, _, key = path.partition("/")
        client = shared_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"s3://{path} does not exist") from None
        except (BotoCoreError, ClientError) as e:  # an OSError, as pyarrow's reads raise (explained() reads it)
            raise OSError(f"s3://{path}: {e}") from e
    with fs.open_input_stream(path) as f:
        return f.read()


class OutputDir:
    """A job's output folder, local or s3://. Every file appears whole or not at all.

    Local files are written under a temporary name in the same folder, then renamed; S3 objects
    are single PUTs or completed multipart uploads, which S3 makes visible atomically.
    """

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser())
        if is_s3(self.uri):
            self.bucket, self.prefix = parse_s3_url(self.uri)
            self._client = s3_client()
        else:
            Path(self.uri).mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """Fail early with one line (OSError) when the output cannot be written: a missing or forbidden bucket."""
        if is_s3(self.uri):
            try:
                with explained(f"--output {self.uri}"):
                    self._client.head_bucket(Bucket=self.bucket)
            except self._client.exceptions.ClientError as e:  # a fault without a fix of its own to name
                code = e.response.get("Error", {}).get("Code", "error")
                raise OSError(
                    f"--output {self.uri}: bucket {self.bucket!r} is missing or not accessible ({code})"
                ) from None
        elif not os.access(self.uri, os.W_OK):
            raise OSError(f"--output {self.uri}: not writable")

    def path(self, rel: str) -> str:
        """The full location of `rel` (for messages and manifests)."""
        return f"{self.uri}/{rel}" if is_s3(self.uri) else str(Path(self.uri) / rel)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def write_bytes(self, rel: str, data: bytes) -> str:
        if is_s3(self.uri):
            with explained(self.path(rel)):
                self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        else:
            target = Path(self.uri) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, target)
            except BaseException:  # a full disk: no half-written temporary file left behind
                tmp.unlink(missing_ok=True)
                raise
        return self.path(rel)

    def write_file(self, rel: str, local_file: str | Path) -> str:
        """Move a finished local file into place (uploaded, for S3: multipart, completed at the end)."""
        if is_s3(self.uri):
            with explained(self.path(rel)):
                self._client.upload_file(str(local_file), self.bucket, self._key(rel))
            os.unlink(local_file)
        else:
            target = Path(self.uri) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(local_file, 0o644)  # mkstemp made it 0600; outputs are readable like every other file
            os.replace(local_file, target)
        return self.path(rel)

    def read(self, rel: str) -> bytes:
        """The bytes of `rel`; FileNotFoundError naming it when absent."""
        return read_bytes(self.path(rel))

    def exists(self, rel: str) -> bool:
        if is_s3(self.uri):
            with explained(self.path(rel)):
                try:
                    self._client.head_object(Bucket=self.bucket, Key=self._key(rel))
                    return True
                except self._client.exceptions.ClientError as e:
                    if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                        return False
                    raise
        return (Path(self.uri) / rel).is_file()

    def list(self, rel_dir: str) -> list[str]:
        """Names of the files directly in folder `rel_dir` (sorted; temporary files excluded)."""
        if is_s3(self.uri):
            prefix = self._key(rel_dir.strip("/"))
            with explained(self.path(rel_dir)):
                names = [o["Key"][len(prefix) + 1 :] for o in list_objects(self._client, self.bucket, prefix)]
            names = [n for n in names if "/" not in n]
        else:
            folder = Path(self.uri) / rel_dir
            names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        return sorted(n for n in names if not n.startswith("."))

    def remove(self, rel: str) -> None:
        """Delete file `rel` or everything under folder `rel` (no error when absent)."""
        if is_s3(self.uri):
            with explained(self.path(rel)):
                keys = [o["Key"] for o in list_objects(self._client, self.bucket, self._key(rel.strip("/")))]
                keys += [self._key(rel)]
                for i in range(0, len(keys), 1000):
                    self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
                    )
        else:
            target = Path(self.uri) / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def scratch(self, suffix: str = "") -> str:
        """A temporary local file to build a large output in before `write_file` (same disk when local)."""
        folder = self.uri if not is_s3(self.uri) else None
        fd, name = tempfile.mkstemp(prefix=".d3hr-", suffix=suffix, dir=folder)
        os.close(fd)
        return name
