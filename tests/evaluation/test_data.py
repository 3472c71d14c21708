"""Classifier rows and the random-real baseline's selection."""

import io
from collections import Counter

import numpy as np
from PIL import Image

from d3hr_ray.data.digits import digits_split
from d3hr_ray.evaluation.data import classifier_rows, distilled_location, random_real_keys
from d3hr_ray.seeding import derive_seed


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_classifier_rows_are_uint8_and_refusals_keep_their_place():
    img = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    out = classifier_rows(
        {"item": np.array([_png(img), b"junk", _png(img)], dtype=object), "label": np.array([0, 1, -1])}, resolution=8
    )
    assert out["image"].dtype == np.uint8 and out["image"].shape == (3, 3, 8, 8)
    assert out["ok"].tolist() == [True, False, False]
    assert "not an image" in out["reason"][1] and out["reason"][2] == "not in a class"
    # Shorter side already 8: the centre 8x8 crop of the 8x12 image.
    np.testing.assert_array_equal(out["image"][0], img[:, 2:10].transpose(2, 0, 1))


def _stream(labels, keys, size):
    for s in range(0, len(labels), size):
        yield {"label": np.array(labels[s : s + size]), "key": np.array(keys[s : s + size], dtype=object)}


def test_random_real_keeps_k_per_class_whatever_the_order():
    labels = [c for c in range(4) for _ in range(20)] + [-1]
    keys = [f"img{i}" for i in range(len(labels))]
    chosen, short = random_real_keys(_stream(labels, keys, 7), 5, seed=3)
    assert len(chosen) == 20 and short == {} and {s for _, s in chosen.values()} == {-1}  # no shard ids in this stream
    assert all(labels[keys.index(k)] == c for k, (c, _) in chosen.items())
    by_class = Counter(labels[keys.index(k)] for k in chosen)
    assert by_class == {0: 5, 1: 5, 2: 5, 3: 5}
    perm = np.random.default_rng(1).permutation(len(labels))
    again, _ = random_real_keys(_stream([labels[i] for i in perm], [keys[i] for i in perm], 13), 5, seed=3)
    assert again == chosen  # the same subset for any order and batching
    other, _ = random_real_keys(_stream(labels, keys, 7), 5, seed=4)
    assert other != chosen
    _, short = random_real_keys(_stream(labels, keys, 7), 25, seed=3)
    assert short == {0: 20, 1: 20, 2: 20, 3: 20}


def test_random_real_keeps_the_lowest_purpose_keyed_ranks():
    """The subset is a class's K keys of lowest derive_seed(seed, "random-real", key): sorted here, not heaped."""
    labels = [c % 3 for c in range(60)]
    keys = [f"n{i:03d}/img.png" for i in range(60)]
    chosen, _ = random_real_keys(_stream(labels, keys, 11), 4, seed=7)
    want = set()
    for c in range(3):
        mine = [k for k, lab in zip(keys, labels, strict=True) if lab == c]
        want |= set(sorted(mine, key=lambda k: derive_seed(7, "random-real", k))[:4])
    assert set(chosen) == want


def test_random_real_returns_each_chosen_key_with_its_shard():
    labels = [c % 2 for c in range(30)]
    keys = [f"k{i}" for i in range(30)]
    shard_of = {k: i // 7 for i, k in enumerate(keys)}
    batches = (
        {
            "label": np.array(labels[s : s + 7]),
            "key": np.array(keys[s : s + 7], dtype=object),
            "shard": np.array([shard_of[k] for k in keys[s : s + 7]]),
        }
        for s in range(0, 30, 7)
    )
    chosen, _ = random_real_keys(batches, 3, seed=1)
    plain, _ = random_real_keys(_stream(labels, keys, 5), 3, seed=1)
    assert set(chosen) == set(plain) and all(chosen[k][1] == shard_of[k] for k in chosen)


def test_random_real_is_uniform_over_seeds():
    keys = [f"k{i}" for i in range(10)]
    counts = Counter()
    for seed in range(2000):
        chosen, _ = random_real_keys(_stream([0] * 10, keys, 10), 3, seed=seed)
        counts.update(list(chosen))
    # Each key is chosen with probability 3/10: 600 of 2000; binomial sd ~ 20.5.
    assert all(abs(counts[k] - 600) < 5 * 20.5 for k in keys), counts


def test_digits_split_and_distilled_location(tmp_path):
    train, test = digits_split(1797, "digits:train"), digits_split(1797, "digits:test")
    assert train.sum() == 1348 and test.sum() == 449 and not (train & test).any()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{}")
    assert distilled_location(str(tmp_path / "run")) == str(tmp_path / "run") + "/distilled.parquet"
    assert distilled_location(str(tmp_path)) == str(tmp_path)
