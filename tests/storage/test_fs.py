"""storage/fs.py: OutputDir's atomic writes, listing and removal, locally and on S3 (moto's server); the ranged reader's
bytes and requests; whole-object reads."""

import random

import pytest
from pyarrow import fs as pafs

from d3hr_ray.storage.fs import OutputDir, open_ranged, read_bytes, read_object
from tests.conftest import S3_TEST_ENV


def exercise(out: OutputDir) -> None:
    out.check_writable()
    out.write_bytes("a/one.bin", b"1")
    out.write_bytes("a/two.bin", b"22")
    out.write_bytes("a/sub/three.bin", b"333")
    out.write_bytes("top.json", b"{}")
    assert out.list("a") == ["one.bin", "two.bin"]  # files directly in the folder only
    assert out.list("missing") == []
    assert out.read("a/two.bin") == b"22" and read_bytes(out.path("a/sub/three.bin")) == b"333"
    assert out.exists("top.json") and not out.exists("a/none.bin")
    with pytest.raises(FileNotFoundError, match="none.bin"):
        out.read("a/none.bin")
    out.remove("a")
    out.remove("never-there")
    assert out.list("a") == [] and not out.exists("a/sub/three.bin") and out.exists("top.json")
    out.remove("top.json")
    assert not out.exists("top.json")


def test_local(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    exercise(out)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_local_write_failure_leaves_no_temporary_file(tmp_path):
    out = OutputDir(str(tmp_path))
    with pytest.raises(TypeError):
        out.write_bytes("x.bin", "not bytes")  # fails inside the write, after the temporary file was opened
    assert list(tmp_path.iterdir()) == []


def test_scratch_files_become_readable_outputs(tmp_path):
    out = OutputDir(str(tmp_path))
    tmp = out.scratch(".parquet")
    with open(tmp, "wb") as f:
        f.write(b"data")
    out.write_file("d.parquet", tmp)
    assert (tmp_path / "d.parquet").stat().st_mode & 0o777 == 0o644


def test_s3(s3_server, monkeypatch):
    import boto3

    for k, v in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="fs-test")
    exercise(OutputDir("s3://fs-test/prefix/run"))
    with pytest.raises(OSError, match="bucket 'no-bucket' is missing or not accessible"):
        OutputDir("s3://no-bucket/x").check_writable()


class CountingFile:
    """What open_ranged needs of a pyarrow random-access file: size() and read_at(n, offset), each call recorded."""

    def __init__(self, data: bytes):
        self.data, self.calls, self.closed = data, [], False

    def size(self) -> int:
        return len(self.data)

    def read_at(self, n: int, offset: int) -> bytes:
        self.calls.append((offset, n))
        return self.data[offset : offset + n]

    def close(self) -> None:
        self.closed = True


class OneFile:
    def __init__(self, f: CountingFile):
        self.f = f

    def open_input_file(self, path):
        return self.f


def test_ranged_reader_returns_the_bytes_of_any_reads_and_seeks_in_large_requests():
    data = random.Random(0).randbytes(10_000)
    block = 1_000
    f = CountingFile(data)
    # Small sequential reads (a tar's headers): one request a block, each a whole block but the last.
    with open_ranged(OneFile(f), "x", block=block) as r:
        assert r.raw.size() == len(data)
        got = b"".join(iter(lambda: r.read(37), b""))
    assert got == data and f.closed
    assert len(f.calls) == -(-len(data) // block) and all(n >= block for _, n in f.calls)
    # Seeks and reads anywhere (forward, back, from the end) give the file's bytes, as a plain slice does.
    f = CountingFile(data)
    rng = random.Random(1)
    with open_ranged(OneFile(f), "x", block=block) as r:
        for _ in range(200):
            target, n = rng.randrange(len(data) + 10), rng.randrange(3 * block)
            whence = rng.choice([0, 1, 2])
            assert r.seek({0: target, 1: target - r.tell(), 2: target - len(data)}[whence], whence) == target
            assert r.tell() == target and r.read(n) == data[target : target + n]
    # Reads inside the buffered block cost nothing: at most one request a read that leaves it (plus the large read).
    assert all(n >= block or offset + n == len(data) for offset, n in f.calls)


def test_read_object_locally_and_on_s3_in_one_get(tmp_path, s3_server, monkeypatch):
    import boto3

    (tmp_path / "a.bin").write_bytes(b"local bytes")
    assert read_object(pafs.LocalFileSystem(), str(tmp_path / "a.bin")) == b"local bytes"
    for k, v in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    client.create_bucket(Bucket="read-object")
    client.put_object(Bucket="read-object", Key="k/a.bin", Body=b"remote bytes")
    s3fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1")
    assert read_object(s3fs, "read-object/k/a.bin") == b"remote bytes"
    with pytest.raises(FileNotFoundError, match="read-object/k/none.bin"):
        read_object(s3fs, "read-object/k/none.bin")
    with pytest.raises(OSError, match="no-such-bucket"):
        read_object(s3fs, "no-such-bucket/x")
