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
