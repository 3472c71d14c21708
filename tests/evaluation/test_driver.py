"""evaluation/driver.py: the cache rule, the listed count, and the teacher's features streamed by Ray Data against
the same teacher run here on the same images."""

import numpy as np
import torch

from d3hr_ray.data.sources import list_source, read_shard
from d3hr_ray.evaluation.driver import feature_batches, listed_rows
from d3hr_ray.training.protocol import IMAGENET_MEAN, IMAGENET_STD, normalize
from d3hr_ray.training.students import build_student
from d3hr_ray.workers.datasets import open_listing


def test_listed_rows_is_the_listing_count(ray_local):
    src = open_listing(list_source("digits:test", model_names=None, num_model_classes=10, classes=["0", "1"]))
    assert listed_rows(src) == sum(1 for s in src.listing.shards for _ in read_shard(s))


def test_streamed_features_equal_the_teacher_here(ray_local):
    torch.manual_seed(0)
    teacher = build_student("conv3", 10, 16).eval()
    meta = {
        "arch": "conv3",
        "num_classes": 10,
        "resolution": 16,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    ref = ray_local.put((meta, {k: v.clone() for k, v in teacher.state_dict().items()}))
    listing = list_source("digits:test", model_names=None, num_model_classes=10, shard_size=60)
    got = {}
    for b in feature_batches(listing.shards, ref, actors=1):
        assert b["ok"].all()
        got.update(
            {
                str(k): (int(y), int(s), f)
                for k, y, s, f in zip(b["key"], b["label"], b["shard"], b["feature"], strict=True)
            }
        )
    assert len(got) == 449
    # The same images, by hand: digits' 8x8 grey levels to RGB, resized to 16 (bicubic, as to_pixels), normalised.
    from d3hr_ray.data.preprocess import to_pixels

    rows = [(s.id, r) for s in listing.shards for r in read_shard(s)]
    x = normalize(torch.from_numpy(np.stack([to_pixels(r["item"], 16) for _, r in rows])), IMAGENET_MEAN, IMAGENET_STD)
    grabbed = []
    handle = teacher.classifier.register_forward_hook(lambda m, i, o: grabbed.append(i[0].flatten(1)))
    with torch.no_grad():
        teacher(x)
    handle.remove()
    feats = grabbed[0].numpy()
    for (sid, r), f in zip(rows, feats, strict=True):
        y, s, g = got[r["key"]]
        assert (y, s) == (r["label"], sid)
        np.testing.assert_allclose(g, f, rtol=1e-4, atol=1e-5)
