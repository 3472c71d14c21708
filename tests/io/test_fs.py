"""io/fs.py: OutputDir's atomic writes, listing and removal, locally and on S3 (moto's server)."""

import pytest

from d3hr_ray.io.fs import OutputDir, read_bytes
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
