"""The models' fixtures: a tiny pipeline saved to a folder, and S3 (moto's server) for its s3:// copies."""

from pathlib import Path

import boto3
import pytest

from d3hr_ray import build_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = build_pipeline(num_classes=3, class_names=["ant", "bee", "cow"], seed=1)
    folder = tmp_path_factory.mktemp("model") / "tiny-dit"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    s3_endpoint = s3_server
    for k, v in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "D3HR_CACHE_DIR": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(k, v)
    return boto3.client("s3", endpoint_url=s3_endpoint)


def upload(client, folder: Path, bucket: str, prefix: str):
    for f in folder.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
