"""storage/local_s3.py: moto's server as a context manager (the suite's s3_server fixture and benchmarks/s3.py)."""

import socket

import boto3

from d3hr_ray.storage.local_s3 import local_s3_server
from tests.conftest import S3_TEST_ENV


def test_the_server_answers_s3_and_stops_with_the_block(monkeypatch):
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    with local_s3_server() as url:
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket="bucket")
        s3.put_object(Bucket="bucket", Key="k", Body=b"x")
        assert s3.get_object(Bucket="bucket", Key="k")["Body"].read() == b"x"
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex((host, int(port))) != 0
