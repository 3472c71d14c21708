"""The classifier loop's config and its data cache (the loop itself runs under Ray Train in tests/test_evaluate.py)."""

import dataclasses

import numpy as np
import pytest

from d3hr_ray.training.classifier_loop import EVAL_BATCH_SIZE, ClassifierLoopConfig, fits_cache, load_rows
from d3hr_ray.training.protocol import FLIP_P, IMAGENET_MEAN, IMAGENET_STD


def _cfg(**kw):
    base = dict(
        objective="ce",
        arch="conv3",
        num_classes=10,
        resolution=16,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        weight_decay=0.01,
        crop_scale=(0.5, 1.0),
        eval_every=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        seed=0,
        cache_train=True,
        cache_test=True,
    )
    return ClassifierLoopConfig(**{**base, **kw})


def test_loop_config_defaults_and_checks():
    cfg = _cfg()
    assert (cfg.flip_p, cfg.eval_batch_size, cfg.cutmix_alpha, cfg.temperature) == (FLIP_P, EVAL_BATCH_SIZE, 0.0, 1.0)
    assert FLIP_P == 0.5 and EVAL_BATCH_SIZE == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    with pytest.raises(ValueError, match="teacher_ref"):
        _cfg(objective="kd")
    with pytest.raises(ValueError, match="teacher_ref"):
        _cfg(objective="soft")
    with pytest.raises(ValueError, match="cache"):
        _cfg(objective="soft", teacher_ref="ref", cache_train=False)
    with pytest.raises(ValueError, match="objective"):
        _cfg(objective="mse")
    with pytest.raises(ValueError, match="architecture"):
        _cfg(arch="resnet7")
    with pytest.raises(ValueError, match="epochs"):
        _cfg(epochs=0)


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_batch_loss_of_each_regime_against_numpy():
    """hard: CutMix mixes one-hot labels by the pasted area; soft: KL to the stored targets mixed the same way."""
    import torch

    from d3hr_ray.training.classifier_loop import batch_loss
    from d3hr_ray.training.protocol import AugmentParams

    K, B = 10, 4
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, generator=g) * 2  # this worker's rows 1 and 3 of a global batch of 4
    rows = np.array([1, 3])
    yb = torch.tensor([2, 5, 7, 9])
    partner = np.array([3, 0, 1, 2])
    cut = np.array([0.0, 0.0, 0.5, 0.25])  # top-left box, 8 x 4 px of 16 x 16: an eighth of the image pasted
    p = AugmentParams(np.tile([0.0, 0.0, 1.0, 1.0], (B, 1)), np.zeros(B, bool), partner, cut)
    share = 8 * 4 / 256
    logq = _log_softmax(logits.double().numpy())
    hard = batch_loss(_cfg(objective="ce"), logits, None, yb, None, None, p, rows, denom=2.0)
    own, other = yb.numpy()[rows], yb.numpy()[partner[rows]]
    want = -((1 - share) * logq[[0, 1], own] + share * logq[[0, 1], other]).sum() / 2
    assert hard.item() == pytest.approx(want, rel=1e-5)
    # No box pasted: the plain cross-entropy on the rows' labels.
    plain = AugmentParams(p.boxes, p.flip, partner, np.zeros(4))
    got = batch_loss(_cfg(objective="ce"), logits, None, yb, None, None, plain, rows, denom=2.0).item()
    assert got == pytest.approx(-logq[[0, 1], own].sum() / 2, rel=1e-5)
    # soft: stored targets of the cached rows idx, mixed by the same area, KL at T.
    T = 4.0
    stored = torch.softmax(torch.randn(6, K, generator=g), 1)  # the cached set's 6 images
    idx = np.array([5, 0, 3, 2])  # the global batch's rows of the cached set
    cfg = _cfg(objective="soft", teacher_ref="ref", temperature=T)
    got = batch_loss(cfg, logits, None, yb, stored, idx, p, rows, denom=2.0).item()
    t = stored.double().numpy()
    mixed = (1 - share) * t[idx[rows]] + share * t[idx[partner[rows]]]
    logq_t = _log_softmax(logits.double().numpy() / T)
    want = (mixed * (np.log(mixed) - logq_t)).sum() / 2
    assert got == pytest.approx(want, rel=1e-5)


class FakeShard:
    """A Ray Data iterator of classifier rows, cut into batches of the requested size."""

    def __init__(self, rows: dict):
        self.rows = rows

    def iter_batches(self, batch_size, batch_format):
        n = len(self.rows["label"])
        for s in range(0, n, batch_size):
            yield {k: v[s : s + batch_size] for k, v in self.rows.items()}


def test_load_rows_keeps_the_usable_rows_in_order_and_counts_the_rest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 3, 4, 4), dtype=np.uint8)
    ok = np.array([True, False, True, True, False, True, True])
    shard = FakeShard({"image": image, "label": np.arange(7), "ok": ok})
    x, y, refused = load_rows(shard, batch_size=3)
    np.testing.assert_array_equal(x.numpy(), image[ok])
    assert y.tolist() == [0, 2, 3, 5, 6] and refused == 2
    x, y, refused = load_rows(FakeShard({"image": image[:0], "label": np.arange(0), "ok": ok[:0]}))
    assert x.shape == (0, 3, 1, 1) and len(y) == 0 and refused == 0


def test_a_streamed_pass_yields_the_usable_rows_and_counts_the_refused_ones():
    from d3hr_ray.training.classifier_loop import _stream

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (7, 3, 4, 4), dtype=np.uint8)
    ok = np.array([False, True, True, False, False, True, True])
    refused = [0]
    batches = list(_stream(FakeShard({"image": image, "label": np.arange(7), "ok": ok}), 2, refused))
    assert [y.tolist() for _, y in batches] == [[1], [2], [5], [6]]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in batches]), image[ok])
    assert refused == [3]


def test_fits_cache_counts_uint8_bytes():
    gib = 2**30
    assert fits_cache(1000, 32, 1000 * 3 * 32 * 32 / gib)  # exactly the budget
    assert not fits_cache(1001, 32, 1000 * 3 * 32 * 32 / gib)
    assert fits_cache(0, 224, 0.0) and not fits_cache(1, 8, 0.0)
