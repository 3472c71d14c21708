"""benchmarks/s3.py: the counting proxy counts what passes, and the benchmark's counts at a tiny size against the
requests each kind must need, computed here from the data's shape."""

import argparse

import boto3

from benchmarks.s3 import CountingProxy, measure
from tests.conftest import S3_TEST_ENV


def test_the_proxy_counts_requests_and_bytes_by_method_and_phase(s3_server, monkeypatch):
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    direct = boto3.client("s3", endpoint_url=s3_server)
    direct.create_bucket(Bucket="proxy-count")
    bodies = [b"x" * 10, b"y" * 300, b""]
    for i, b in enumerate(bodies):
        direct.put_object(Bucket="proxy-count", Key=f"k{i}", Body=b)
    proxy = CountingProxy(("127.0.0.1", int(s3_server.rsplit(":", 1)[1])))
    try:
        client = boto3.client("s3", endpoint_url=proxy.url)
        gets = proxy.phase("gets")
        got = [client.get_object(Bucket="proxy-count", Key=f"k{i}")["Body"].read() for i in range(3)]
        heads = proxy.phase("heads")
        client.head_object(Bucket="proxy-count", Key="k1")
        client.head_object(Bucket="proxy-count", Key="k2")
    finally:
        proxy.close()
    assert got == bodies
    assert gets.requests == {"GET": 3} and gets.bytes == {"GET": sum(map(len, bodies))}
    assert heads.requests == {"HEAD": 2} and heads.bytes == {"HEAD": 0}


def test_requests_a_kind_needs_at_a_tiny_size():
    args = argparse.Namespace(
        kinds=["webdataset", "parquet", "imagefolder"],
        tars=3,
        per_tar=40,
        row_group=20,
        folders=3,
        per_folder=4,
        shard_size=1024,
    )
    rows = {r.kind: r for r in measure(args)}
    wds, pq, imf = rows["webdataset"], rows["parquet"], rows["imagefolder"]
    assert (wds.samples, wds.shards) == (3 * 40, 3)  # a shard a tar: 40 < 1,024
    # WebDataset: listing two requests a tar (its size, one 8 MiB range), plus a constant: the kind's detection (a
    # HEAD and two LISTs, by the caller, list_source and the lister), classes.txt, the size probe's two; reading:
    # each shard's size and one range.
    overhead = 3 * 3 + 1 + 2
    assert wds.listing_requests <= 2 * args.tars + overhead and wds.reading_requests <= 2 * wds.shards
    assert (pq.samples, pq.shards) == (3 * 40, 3 * 2)  # a shard a row group
    assert pq.reading_requests <= 3 * pq.shards  # size, footer, the row group's columns in one range
    assert pq.listing_requests <= 3 * args.tars + overhead  # size, footer, the label column of every row group
    # ImageFolder: one GET an image, plus each shard's LIST of its folder; no size request (HEAD).
    assert (imf.samples, imf.shards) == (3 * 4, 3)
    assert imf.reading["requests"] == {"GET": imf.samples + imf.shards}
    assert imf.listing_requests <= args.folders + overhead  # a LIST a folder
