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


def header_offsets(path) -> list[int]:
    """The header offset of each sample's first member, by tarfile's own reading of the whole tar."""
    with tarfile.open(path) as tf:
        out, last = [], None
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            if key != last:
                out.append(m.offset)
                last = key
    return out


def test_a_stats_only_read_on_s3_costs_at_most_a_tenth_of_a_request_a_sample(tmp_path, s3_server, monkeypatch):
    import boto3

    from benchmarks.s3 import CountingProxy

    tars, per_tar = 3, 200
    root = tmp_path / "many"
    root.mkdir()
    for t in range(tars):
        write_tar(root / f"p-{t:06d}.tar", [good(t * per_tar + i, i % 3) for i in range(per_tar)])
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    direct = boto3.client("s3", endpoint_url=s3_server)
    direct.create_bucket(Bucket="wds-count")
    for f in root.iterdir():
        direct.put_object(Bucket="wds-count", Key=f"d/{f.name}", Body=f.read_bytes())
    proxy = CountingProxy(("127.0.0.1", int(s3_server.rsplit(":", 1)[1])))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        listed = proxy.phase("listing")
        assert source_kind("s3://wds-count/d") == "webdataset"
        listing = list_source("s3://wds-count/d", model_names=None, num_model_classes=None)
        read = proxy.phase("reading")
        remote = [r for s in listing.shards for r in read_shard(s)]
    finally:
        proxy.close()
    # What the stats-only job does with the data: one listing, every shard read once.
    assert listed.total + read.total <= 0.1 * tars * per_tar, (listed, read)
    assert read.total <= 2 * tars  # a shard of small samples: its size, then one ranged GET
    local = rows_of(list_source(str(root), model_names=None, num_model_classes=None))
    assert [(r["key"], r["label"], r["item"]) for r in remote] == [(r["key"], r["label"], r["item"]) for r in local]
    assert len(remote) == tars * per_tar and [s.offset for s in listing.shards] == [0] * tars


def test_the_index_is_kept_under_the_output_and_a_rerun_lists_no_tar(shards, tmp_path, monkeypatch):
    from d3hr_ray.data import webdataset

    out = tmp_path / "out"
    first = list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2, output=str(out))
    files = sorted((out / "_state" / "index").iterdir())
    assert len(files) == 2  # one a tar
    docs = {
        json.loads(f.read_text())["shardlist"][0]["url"].rsplit("/", 1)[1]: json.loads(f.read_text()) for f in files
    }
    for name, n in (("a-000000.tar", 5), ("a-000001.tar", 7)):
        doc = docs[name]
        assert doc["__kind__"] == "wids-shard-index-v1" and doc["wids_version"] == 1
        (entry,) = doc["shardlist"]
        assert entry["nsamples"] == n and entry["filesize"] == (shards / name).stat().st_size
        assert entry["d3hr"]["offsets"] == header_offsets(shards / name)
    # s005-s011: 0, 1 (.json), 2 (no image), none, 7, 1, unreadable (.cls "x")
    assert docs["a-000001.tar"]["shardlist"][0]["d3hr"]["labels"] == [0, 1, 2, None, 7, 1, None]

    def no_listing(fs, tar):
        raise AssertionError(f"{tar} listed again")

    monkeypatch.setattr(webdataset, "index_tar", no_listing)
    again = list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2, output=str(out))
    assert again == first and rows_of(again) == rows_of(first)
    # A tar that changed (another size) is listed again, not read from a stale index.
    write_tar(shards / "a-000000.tar", [good(i, i % 3) for i in range(4)])
    with pytest.raises(AssertionError, match="a-000000.tar listed again"):
        list_source(str(shards), model_names=None, num_model_classes=None, output=str(out))


def test_a_cut_tar_keeps_its_reason_through_the_index(tmp_path, monkeypatch):
    from d3hr_ray.data import webdataset

    root = tmp_path / "cut"
    root.mkdir()
    write_tar(root / "x.tar", [good(i, i % 2) for i in range(4)])
    (root / "x.tar").write_bytes((root / "x.tar").read_bytes()[: 512 * 9 + 100])
    first = list_source(str(root), model_names=None, num_model_classes=None, output=str(tmp_path / "o"))
    monkeypatch.setattr(webdataset, "index_tar", None)  # any listing of the tar would fail
    again = list_source(str(root), model_names=None, num_model_classes=None, output=str(tmp_path / "o"))
    assert again.skipped == first.skipped and again.skipped[0][1].startswith("truncated tar after 2 samples")
    assert sum(again.counts.values()) == 2


def test_a_wids_index_names_the_tars_and_one_that_disagrees_is_refused_by_name(shards, monkeypatch):
    from d3hr_ray.data import webdataset

    folder = list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2)
    expected = [(r["key"], r["label"], r["reason"], r["item"]) for r in rows_of(folder)]
    size1 = (shards / "a-000001.tar").stat().st_size

    def index(entries, name="index.json"):
        (shards / name).write_text(
            json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries})
        )
        return str(shards / name)

    # A plain wids index (nsamples, filesize): the tars are listed and checked against it.
    plain = index([{"url": "a-000000.tar", "nsamples": 5}, {"url": "a-000001.tar", "nsamples": 7, "filesize": size1}])
    assert source_kind(plain) == "webdataset"
    listing = list_source(plain, model_names=None, num_model_classes=None, shard_size=2)
    assert listing.skipped == [] and listing.counts == folder.counts
    assert [(r["key"], r["label"], r["reason"], r["item"]) for r in rows_of(listing)] == expected
    wrong = index([{"url": "a-000000.tar", "nsamples": 6}, {"url": str(shards / "a-000001.tar"), "nsamples": 7}])
    listing = list_source(wrong, model_names=None, num_model_classes=None, shard_size=2)
    assert listing.skipped == [
        (
            f"{wrong} (entry a-000000.tar)",
            "refused: the index says 6 samples, the tar has 5; the tar was listed instead",
        )
    ]
    assert [(r["key"], r["label"]) for r in rows_of(listing)] == [(k, y) for k, y, _, _ in expected]
    # Entries that carry the listing (offsets and labels, as the cache writes them) are read instead of the tars.
    full = [
        {
            "url": name,
            "nsamples": len(header_offsets(shards / name)),
            "filesize": (shards / name).stat().st_size,
            "d3hr": {"offsets": header_offsets(shards / name), "labels": labels},
        }
        for name, labels in (("a-000000.tar", [0, 1, 2, 0, 1]), ("a-000001.tar", [0, 1, 2, None, 7, 1, None]))
    ]
    real = webdataset.index_tar
    listed = []
    monkeypatch.setattr(webdataset, "index_tar", lambda fs, tar: listed.append(tar) or real(fs, tar))
    listing = list_source(index(full), model_names=None, num_model_classes=None, shard_size=2)
    assert listed == [] and listing.skipped == [] and listing.counts == folder.counts
    assert [(r["key"], r["label"], r["reason"], r["item"]) for r in rows_of(listing)] == expected
    # An entry whose tar has another size is refused by name, and that tar alone is listed.
    full[1]["filesize"] = size1 + 512
    listing = list_source(index(full), model_names=None, num_model_classes=None, shard_size=2)
    assert [t.rsplit("/", 1)[1] for t in listed] == ["a-000001.tar"]
    ((where, why),) = listing.skipped
    assert where.endswith("index.json (entry a-000001.tar)") and why.startswith(
        f"refused: the index says {size1 + 512} bytes, the tar has {size1}"
    )
    assert [(r["key"], r["label"], r["reason"]) for r in rows_of(listing)] == [(k, y, w) for k, y, w, _ in expected]
    # Not a wids index; a tar it names that does not exist.
    (shards / "other.json").write_text('{"shardlist": []}')
    with pytest.raises(ValueError, match="must be a wids index"):
        list_source(str(shards / "other.json"), model_names=None, num_model_classes=None)
    (shards / "nested.json").write_text('{"wids_version": 1, "shardlist": [], "datasets": [{"source_url": "x"}]}')
    with pytest.raises(ValueError, match='nested wids "datasets" are not read'):
        list_source(str(shards / "nested.json"), model_names=None, num_model_classes=None)
    with pytest.raises(FileNotFoundError, match="1 tar"):
        list_source(index([{"url": "a-000009.tar"}]), model_names=None, num_model_classes=None)


def test_a_shard_that_finds_fewer_samples_than_listed_fails_instead_of_losing_rows(shards):
    import dataclasses

    listing = list_source(str(shards), model_names=None, num_model_classes=None, shard_size=2)
    last = listing.shards[2]  # a-000000.tar's s004
    moved = dataclasses.replace(last, offset=(shards / "a-000000.tar").stat().st_size - 1024)  # the end marker
    with pytest.raises(OSError, match="0 samples from byte .* the listing found 1"):
        list(read_shard(moved))
