"""data/digits.py: the embedded data set and its fixed split."""

import numpy as np

from d3hr_ray.data.sources import list_source
from tests.data.conftest import rows_of


def test_digits_shards_cover_the_split_once():
    listing = list_source("digits:test", model_names=None, num_model_classes=10, shard_size=100)
    keys = [r["key"] for r in rows_of(listing)]
    assert len(keys) == len(set(keys)) == 449 == sum(listing.counts.values())
    assert all(int(k.split("/")[1]) % 4 == 3 for k in keys)
    assert np.all(np.diff([int(k.split("/")[1]) for k in keys]) > 0)


def test_the_digits_are_parsed_once_a_process_and_shared_read_only():
    from sklearn.datasets import load_digits

    from d3hr_ray.data.digits import digits_rgb

    rgb, target = digits_rgb()
    assert digits_rgb()[0] is rgb  # the cached arrays, not a second parse
    assert not rgb.flags.writeable and not target.flags.writeable
    d = load_digits()  # independently: grey levels 0..16 to 0..255, the same level in R, G and B
    assert np.array_equal(rgb[..., 1], np.round(d.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and np.array_equal(target, d.target)
