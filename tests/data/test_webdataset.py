"""data/webdataset.py: tars written here (samples of several members, every kind of bad sample, a tar cut short),
listed from headers alone and read back, locally and on moto's S3."""

import io
import json
import tarfile

import pytest

from d3hr_ray.data.sources import list_source, read_shard, source_kind
from d3hr_ray.data.webdataset import expand_braces
from tests.conftest import S3_TEST_ENV
from tests.data.conftest import png, rows_of, usable

NAMES = ["cat", "dog", "emu"]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path, samples) -> None:
    """samples: (key, {extension: bytes}) in order."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)


def good(i: int, label: int, ext: str = "png") -> tuple[str, dict]:
    return f"s{i:03d}", {ext: png(10 * i), "cls": str(label).encode()}


@pytest.fixture
def shards(tmp_path):
    """Two tars of the three classes (classes.txt beside them), with a sample of each kind of fault in the second."""
    root = tmp_path / "wds"
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    write_tar(root / "a-000000.tar", [good(i, i % 3) for i in range(5)])
    bad = [
        good(5, 0, "jpg"),
        ("s006", {"json": json.dumps({"label": 1}).encode(), "webp": png(60)}),  # label from .json (webp holds a PNG)
        ("s007", {"cls": b"2"}),  # no image
        ("s008", {"png": png(80)}),  # no label
        ("s009", {"png": png(90), "cls": b"7"}),  # outside 0..2
        ("s010", {"png": b"not an image", "cls": b"1"}),
        ("s011", {"png": png(110), "cls": b"x"}),  # unreadable label
    ]
    write_tar(root / "a-000001.tar", bad)
    return root


def test_listing_reads_headers_and_labels_and_shards_are_runs_of_one_tar(shards, monkeypatch):
    opened = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: opened.append(m.name) or real(self, m))
    listing = list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2)
    assert source_kind(str(shards)) == "webdataset" and listing.kind == "webdataset"
    assert listing.names == {0: "cat", 1: "dog", 2: "emu"}
    # The listing opened label members and, for its size probe, the first sample's image; no other image.
    assert all(n.endswith((".cls", ".json")) for n in opened if n != "s000.png")
    # s000-s004: 0, 1, 2, 0, 1; s005: 0; s006: 1 (.json); s007: 2 (no image); s010: 1 (an image that will not decode)
    assert listing.counts == {0: 3, 1: 4, 2: 2}
    assert [(s.tar.rsplit("/", 1)[1], s.start, s.stop) for s in listing.shards] == [
        ("a-000000.tar", 0, 2),
        ("a-000000.tar", 2, 4),
        ("a-000000.tar", 4, 5),
        ("a-000001.tar", 0, 2),
        ("a-000001.tar", 2, 4),
        ("a-000001.tar", 4, 6),
        ("a-000001.tar", 6, 7),
    ]
    assert listing.native_size == 6


def test_rows_keep_bad_samples_with_their_reasons(shards):
    rows = rows_of(list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2))
    assert [r["key"] for r in rows] == [f"a-00000{0 if i < 5 else 1}.tar/s{i:03d}" for i in range(12)]
    assert [r["label"] for r in rows] == [0, 1, 2, 0, 1, 0, 1, 2, -1, -1, 1, -1]
    reasons = {r["key"].split("/")[1]: r["reason"] for r in rows}
    assert reasons["s007"].startswith("no image") and reasons["s008"].startswith("no label")
    assert reasons["s009"] == "label 7 is outside 0..2" and reasons["s011"].startswith("unreadable label")
    assert [usable(r) for r in rows] == [True] * 7 + [False] * 5  # s010's bytes are refused when decoded
    assert rows[0]["item"] == png(0) and rows[5]["item"] == png(50)


def test_keys_only_and_only_narrow_the_read(shards, monkeypatch):
    listing = list_source(str(shards), model_names=None, num_model_classes=None, shard_size=3)
    full = rows_of(listing)
    opened = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: opened.append(m.name) or real(self, m))
    keys = [r for s in listing.shards for r in read_shard(s.keys_pass())]
    assert [(r["label"], r["key"]) for r in keys] == [(r["label"], r["key"]) for r in full]
    assert opened and all(n.endswith((".cls", ".json")) for n in opened)  # labels only, no image read
    pick = {r["key"] for r in full[1::3]}
    got = [
        r
        for s in listing.shards
        for r in read_shard(s.narrowed([k for k in pick if k.startswith(s.tar.rsplit("/", 1)[1])]))
    ]
    assert [r["key"] for r in got] == [r["key"] for r in full if r["key"] in pick]


def test_a_tar_cut_short_keeps_its_whole_samples_and_says_where(tmp_path):
    root = tmp_path / "cut"
    root.mkdir()
    write_tar(root / "x.tar", [good(i, i % 2) for i in range(4)])
    data = (root / "x.tar").read_bytes()
    (root / "x.tar").write_bytes(data[: 512 * 9 + 100])  # inside the data of the fifth member (s002.png)
    listing = list_source(str(root), model_names=None, num_model_classes=None)
    assert sum(listing.counts.values()) == 2 and len(rows_of(listing)) == 2
    ((where, why),) = listing.skipped
    assert where.endswith("x.tar") and why.startswith("truncated tar after 2 samples")
    (root / "x.tar").write_bytes(data[: 512 * 8 + 200])  # inside the header of s002.png
    listing = list_source(str(root), model_names=None, num_model_classes=None)
    assert sum(listing.counts.values()) == 2 and listing.skipped[0][1].startswith("truncated tar after 2 samples")


def test_brace_patterns_and_class_names(shards, tmp_path):
    assert expand_braces("d/s-{08..10}.tar") == ["d/s-08.tar", "d/s-09.tar", "d/s-10.tar"]
    assert expand_braces("{0..1}-{0..1}") == ["0-0", "0-1", "1-0", "1-1"]
    with pytest.raises(ValueError, match="backwards"):
        expand_braces("s-{3..1}.tar")
    one = list_source(str(shards / "a-{000000..000000}.tar"), model_names=None, num_model_classes=None)
    assert sum(one.counts.values()) == 5 and source_kind(str(shards / "a-{000000..000001}.tar")) == "webdataset"
    with pytest.raises(FileNotFoundError, match="1 shard"):
        list_source(str(shards / "a-{000000..000002}.tar"), model_names=None, num_model_classes=None)
    # --class-names wins over classes.txt; without either, labels are their numbers; a model's names map by name.
    named = list_source(str(shards), model_names=None, num_model_classes=None, label_names=["x", "y", "z"])
    assert named.names == {0: "x", 1: "y", 2: "z"}
    (shards / "classes.txt").unlink()
    unnamed = list_source(str(shards), model_names=None, num_model_classes=None)
    assert unnamed.names == {i: str(i) for i in range(8)}  # 0..7: s009's label 7 is a class when nothing names them
    (shards / "classes.txt").write_text("cat\ndog\nemu\n")
    mapped = list_source(str(shards), model_names=["emu", "cat", "dog"], num_model_classes=3)
    assert mapped.names == {0: "emu", 1: "cat", 2: "dog"} and mapped.counts == {0: 2, 1: 3, 2: 4}


def test_on_s3(shards, s3_server, monkeypatch):
    import boto3

    for k, v in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="wds")
    for f in shards.iterdir():
        s3.put_object(Bucket="wds", Key=f"train/{f.name}", Body=f.read_bytes())
    local = rows_of(list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2))
    remote = list_source("s3://wds/train", model_names=None, num_model_classes=None, shard_size=2)
    assert remote.names == {0: "cat", 1: "dog", 2: "emu"}
    assert [(r["key"], r["label"], r["reason"], r["item"]) for r in rows_of(remote)] == [
        (r["key"], r["label"], r["reason"], r["item"]) for r in local
    ]
    pattern = list_source(
        "s3://wds/train/a-{000000..000001}.tar", model_names=None, num_model_classes=None, shard_size=2
    )
    assert [r["key"] for r in rows_of(pattern)] == [r["key"] for r in local]
