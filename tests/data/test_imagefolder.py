"""data/imagefolder.py: per-class shards, hidden and stray entries reported."""

from d3hr_ray.data.sources import list_source
from tests.data.conftest import png, rows_of, usable


def test_imagefolder_shards_are_per_class_runs_and_hidden_or_stray_entries_are_reported(tmp_path):
    root = tmp_path / "data"
    for name, n in (("cat", 5), ("dog ü", 2)):
        (root / name / "sub").mkdir(parents=True)
        for i in range(n):
            (root / name / ("sub" if i == 0 else "") / f"{i}.png").write_bytes(png(i))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(png(0))
    (root / "notes.txt").write_text("stray")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    listing = list_source(str(root), model_names=None, num_model_classes=None, shard_size=4)
    assert listing.names == {0: "cat", 1: "dog ü"} and listing.counts == {0: 6, 1: 2}
    assert [(s.label, s.start, s.stop) for s in listing.shards] == [(0, 0, 4), (0, 4, 6), (1, 0, 2)]
    reasons = dict(listing.skipped)
    assert reasons[f"{root}/notes.txt"] == "not inside a class folder"
    assert "hidden folder" in reasons[f"{root}/.cache/"]
    rows = rows_of(listing)
    assert [r["key"] for r in rows] == [
        "cat/1.png",
        "cat/2.png",
        "cat/3.png",
        "cat/4.png",
        "cat/broken.png",
        "cat/sub/0.png",
        "dog ü/1.png",
        "dog ü/sub/0.png",
    ]
    assert [usable(r) for r in rows] == [True] * 4 + [False] + [True] * 3
