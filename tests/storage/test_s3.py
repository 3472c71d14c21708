"""storage/s3.py: s3:// URLs, listing a prefix, and mirroring it into a cache keyed by the objects (moto's server)."""

import hashlib
import os

import pytest

from d3hr_ray.storage import s3
from d3hr_ray.storage.s3 import is_s3, list_objects, mirror_prefix, parse_s3_url
from tests.conftest import S3_TEST_ENV

# A model folder as a prefix, with what must stay out of it: a folder marker, a sibling whose name extends it.
OBJECTS = {
    "models/dit/model_index.json": b'{"a": 1}',
    "models/dit/transformer/config.json": b"{}",
    "models/dit/transformer/weights.bin": bytes(range(256)) * 40,
    "models/dit/empty.txt": b"",
    "models/dit/vae/": b"",
    "models/dit-old/model_index.json": b"old",
    "top.txt": b"top",
}


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket holding OBJECTS on moto's server, reached through boto3's own configuration."""
    import boto3

    for k, v in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    name = f"s3-test-{len(client.list_buckets()['Buckets'])}"
    client.create_bucket(Bucket=name)
    for key, body in OBJECTS.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    return client, name


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _under(prefix: str) -> dict[str, bytes]:
    """OBJECTS under `prefix/`, by their path below it (folder markers are not files)."""
    return {k[len(prefix) + 1 :]: v for k, v in OBJECTS.items() if k.startswith(prefix + "/") and not k.endswith("/")}


@pytest.mark.parametrize(
    "path,want",
    [("s3://b/k", True), ("s3://b", True), ("s3://", True), ("S3://b/k", False), ("/data/s3://b", False)]
    + [("s3:/b/k", False), ("b/k", False), ("", False)],
)
def test_is_s3(path, want):
    assert is_s3(path) is want


def test_is_s3_takes_paths():
    from pathlib import Path

    assert is_s3(Path("data/s3")) is False


@pytest.mark.parametrize(
    "url,want",
    [
        ("s3://bucket/a/b", ("bucket", "a/b")),
        ("s3://bucket/a/b/", ("bucket", "a/b")),
        ("s3://bucket//a/b//", ("bucket", "a/b")),
        ("s3://bucket/a.json", ("bucket", "a.json")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
    ],
)
def test_parse_s3_url(url, want):
    assert parse_s3_url(url) == want


def test_parse_s3_url_errors_name_the_url():
    with pytest.raises(ValueError, match=r"not an s3:// URL: '/data/x'"):
        parse_s3_url("/data/x")
    with pytest.raises(ValueError, match=r"not an s3:// URL: 'S3://b/x'"):
        parse_s3_url("S3://b/x")
    with pytest.raises(ValueError, match=r"s3 URL has no bucket: 's3:///x'"):
        parse_s3_url("s3:///x")
    with pytest.raises(ValueError, match="no bucket"):
        parse_s3_url("s3://")


def test_list_objects_under_a_prefix(bucket):
    client, name = bucket
    got = list_objects(client, name, "models/dit")
    want = {k: v for k, v in OBJECTS.items() if k.startswith("models/dit/") and not k.endswith("/")}
    assert {o["Key"] for o in got} == set(want)  # not the folder marker, not models/dit-old
    for o in got:
        assert o["Size"] == len(want[o["Key"]])
        assert o["ETag"].strip('"') == hashlib.md5(want[o["Key"]]).hexdigest()  # S3's ETag of a one-part upload
    everything = {o["Key"] for o in list_objects(client, name, "")}
    assert everything == {k for k in OBJECTS if not k.endswith("/")}
    assert list_objects(client, name, "models/di") == []  # a prefix is a folder, not the start of a name
    assert list_objects(client, name, "nothing") == []


def test_list_objects_reads_every_page():
    """A listing of more than one page (S3 returns 1,000 keys a page) is read to its end."""
    calls = []

    class Paginator:
        def paginate(self, **kw):
            calls.append(kw)
            yield {"Contents": [{"Key": "p/a", "ETag": "1", "Size": 1}, {"Key": "p/d/", "ETag": "2", "Size": 0}]}
            yield {}  # a page with no Contents
            yield {"Contents": [{"Key": "p/b", "ETag": "3", "Size": 3}]}

    class Client:
        def get_paginator(self, op):
            assert op == "list_objects_v2"
            return Paginator()

    assert [o["Key"] for o in list_objects(Client(), "bk", "p")] == ["p/a", "p/b"]
    assert calls == [{"Bucket": "bk", "Prefix": "p/"}]


def test_mirror_prefix_downloads_every_object_below_the_prefix(bucket, tmp_path):
    _, name = bucket
    folder = mirror_prefix(f"s3://{name}/models/dit", tmp_path)
    assert _files(folder) == _under("models/dit")
    assert folder.parent == tmp_path and len(folder.name) == 24 and int(folder.name, 16) >= 0
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind
    # The whole bucket, for an empty prefix.
    whole = mirror_prefix(f"s3://{name}", tmp_path / "whole")
    assert _files(whole) == {k: v for k, v in OBJECTS.items() if not k.endswith("/")}


def test_mirror_prefix_fetches_an_unchanged_prefix_once(bucket, tmp_path, monkeypatch):
    client, name = bucket
    url = f"s3://{name}/models/dit"
    folder = mirror_prefix(url, tmp_path)
    downloads = []
    real_client = s3.s3_client

    def counting_client():
        c = real_client()
        real_download = c.download_file
        c.download_file = lambda *a, **k: downloads.append(a[1]) or real_download(*a, **k)
        return c

    monkeypatch.setattr(s3, "s3_client", counting_client)
    assert mirror_prefix(url, tmp_path) == folder and downloads == []
    assert mirror_prefix(url + "/", tmp_path) == folder and downloads == []  # a trailing slash is the same prefix
    # The same bytes written again: the same ETags and sizes, nothing fetched.
    client.put_object(Bucket=name, Key="models/dit/model_index.json", Body=OBJECTS["models/dit/model_index.json"])
    assert mirror_prefix(url, tmp_path) == folder and downloads == []
    # A changed object: a new folder, every object fetched again; the old folder is left as it was.
    client.put_object(Bucket=name, Key="models/dit/model_index.json", Body=b'{"a": 2}')
    changed = mirror_prefix(url, tmp_path)
    assert changed != folder and sorted(downloads) == sorted(f"models/dit/{k}" for k in _under("models/dit"))
    assert _files(changed)["model_index.json"] == b'{"a": 2}' and _files(folder) == _under("models/dit")
    # A new object is a change too.
    client.put_object(Bucket=name, Key="models/dit/extra.txt", Body=b"x")
    assert mirror_prefix(url, tmp_path) not in (folder, changed)


def test_mirror_prefix_default_cache_is_d3hr_cache_dir(bucket, tmp_path, monkeypatch):
    _, name = bucket
    monkeypatch.setenv("D3HR_CACHE_DIR", str(tmp_path / "cache"))
    folder = mirror_prefix(f"s3://{name}/models/dit")
    assert folder.parent == tmp_path / "cache" / "s3" and _files(folder) == _under("models/dit")


def test_mirror_prefix_of_nothing_is_file_not_found(bucket, tmp_path):
    _, name = bucket
    with pytest.raises(FileNotFoundError, match=f"no objects under s3://{name}/models/none"):
        mirror_prefix(f"s3://{name}/models/none", tmp_path)
    with pytest.raises(ValueError, match="not an s3:// URL"):
        mirror_prefix(str(tmp_path), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_fetch_leaves_nothing_behind(bucket, tmp_path, monkeypatch):
    _, name = bucket
    real_client = s3.s3_client

    def failing_client():
        c = real_client()
        real_download = c.download_file
        done = []

        def download(*a, **k):
            if done:
                raise ConnectionError("connection reset")
            done.append(a[1])
            return real_download(*a, **k)

        c.download_file = download
        return c

    monkeypatch.setattr(s3, "s3_client", failing_client)
    with pytest.raises(ConnectionError):
        mirror_prefix(f"s3://{name}/models/dit", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written folder that a later run would take for a model
    monkeypatch.setattr(s3, "s3_client", real_client)
    assert _files(mirror_prefix(f"s3://{name}/models/dit", tmp_path)) == _under("models/dit")


def test_a_concurrent_fetch_that_won_the_race_is_used(bucket, tmp_path, monkeypatch):
    """Two workers fetch the same prefix: the second's rename fails on the first's folder, and it returns that."""
    _, name = bucket
    url = f"s3://{name}/models/dit"
    target = mirror_prefix(url, tmp_path / "probe").name  # the folder name these objects get
    real_client = s3.s3_client

    def racing_client():
        c = real_client()
        real_download = c.download_file

        def download(*a, **k):
            winner = tmp_path / "cache" / target
            if not winner.exists():  # the other worker finishes while this one downloads
                winner.mkdir(parents=True)
                (winner / "model_index.json").write_bytes(b"theirs")
            return real_download(*a, **k)

        c.download_file = download
        return c

    monkeypatch.setattr(s3, "s3_client", racing_client)
    folder = mirror_prefix(url, tmp_path / "cache")
    assert folder == tmp_path / "cache" / target and _files(folder) == {"model_index.json": b"theirs"}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target]  # this worker's temporary folder removed


# -- faults a user can fix, explained in one line ---------------------------------------------------------------


def _client_error(code: str, status: int, region: str | None = None):
    from botocore.exceptions import ClientError

    err = {"Code": code, "Message": "x"}
    if region:
        err["Region"] = region
    return ClientError({"Error": err, "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")


@pytest.mark.parametrize(
    "error,expected",
    [
        ("no-credentials", "no AWS credentials found"),
        ("endpoint", "cannot reach http://127.0.0.1:9"),
        (("NoSuchBucket", 404, None), "the bucket 'b' does not exist"),
        (("AccessDenied", 403, None), "access denied"),
        (("InvalidAccessKeyId", 403, None), "access denied"),
        (("PermanentRedirect", 301, "eu-west-1"), "is in another region (eu-west-1): set AWS_REGION=eu-west-1"),
        (
            OSError("When reading information for key 'k' in bucket 'b': AWS Error NO_SUCH_BUCKET during HeadObject"),
            "the bucket 'b' does not exist",
        ),
        (OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."), "access denied"),
        (
            OSError("AWS Error UNKNOWN (HTTP status 301) during HeadObject operation: No response body."),
            "another region",
        ),
        (
            OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7, Couldn't connect"),
            "cannot reach",
        ),
    ],
)
def test_s3_faults_are_explained_in_one_line_naming_the_uri(error, expected, monkeypatch):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from d3hr_ray.storage.s3 import S3Error, explained

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    if error == "no-credentials":
        error = NoCredentialsError()
    elif error == "endpoint":
        error = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b")
    elif isinstance(error, tuple):
        error = _client_error(*error)
    with pytest.raises(S3Error) as got:
        with explained("s3://b/data"):
            raise error
    message = str(got.value)
    assert message.startswith("s3://b/data: ") and expected in message and "\n" not in message
    assert isinstance(got.value, OSError)  # the command lines' user error: exit 1, one line


def test_other_errors_and_local_paths_pass_through():
    from d3hr_ray.storage.s3 import explained

    with pytest.raises(KeyError):
        with explained("s3://b/data"):
            raise KeyError("a bug, not an S3 fault")
    with pytest.raises(OSError, match="disk full"):
        with explained("/local/path"):
            raise OSError("AWS Error ACCESS_DENIED disk full")  # a local path is never explained as S3


def test_jobs_say_it_in_one_line_against_moto_and_a_closed_port(s3_server, tmp_path):
    """End to end: a missing bucket (boto3's and pyarrow's paths) and an unreachable endpoint, before any Ray work."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(S3_TEST_ENV, AWS_ENDPOINT_URL=s3_server, AWS_EC2_METADATA_DISABLED="true", RAY_ADDRESS="")

    def start(*flags, **extra):
        return subprocess.Popen(
            [sys.executable, "-m", "d3hr_ray.distill", *flags],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(proc):
        _, stderr = proc.communicate(timeout=300)
        return proc.returncode, [
            line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading")
        ]

    # The three jobs at once: each spends its seconds importing torch and Ray, one process a core.
    model, data, unreachable = (
        start("--model", "s3://no-such-bucket/model", "--output", str(tmp_path / "o"), "--dry-run"),
        start("--data", "s3://no-such-bucket/data", "--model", "builtin:digits", "--dry-run"),
        start(
            "--model", "s3://b/model", "--dry-run", AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}", AWS_MAX_ATTEMPTS="1"
        ),
    )
    code, err = result(model)
    assert code == 1 and err == [
        "error: s3://no-such-bucket/model: the bucket 'no-such-bucket' does not exist: check its "
        "name (and AWS_ENDPOINT_URL for an S3-compatible store)"
    ]
    code, err = result(data)
    assert (
        code == 1 and len(err) == 1 and "s3://no-such-bucket/data: the bucket 'no-such-bucket' does not exist" in err[0]
    )
    code, err = result(unreachable)
    assert code == 1 and len(err) == 1 and f"cannot reach http://127.0.0.1:{closed}" in err[0]
