"""The student protocol against independent computations (numpy float64, slicing, explicit loops)."""

import math

import numpy as np
import pytest
import torch

from d3hr_ray.training.protocol import (
    AugmentParams,
    apply_augment,
    batch_plan,
    cosine_factor,
    draw_augment,
    kd_loss,
    normalize,
    param_groups,
    soft_targets,
    topk_correct,
)
from d3hr_ray.training.students import ConvNet


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_soft_targets_and_kd_loss_match_a_float64_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g) * 5, torch.randn(6, 10, generator=g) * 5
    T = 20.0
    p = np.exp(_np_log_softmax(t.double().numpy() / T))
    logq = _np_log_softmax(s.double().numpy() / T)
    expected = (p * (np.log(p) - logq)).sum(axis=1).mean()  # batch mean of KL(p || q)
    targets = soft_targets(t, T)
    np.testing.assert_allclose(targets.numpy(), p, rtol=1e-5)
    np.testing.assert_allclose(kd_loss(s, targets, T).item(), expected, rtol=1e-4)
    assert kd_loss(t, targets, T).item() == pytest.approx(0.0, abs=1e-6)  # the teacher itself has zero loss


def test_kd_loss_halves_averaged_like_ddp_equal_the_global_batch_mean():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g), soft_targets(torch.randn(8, 5, generator=g), 4.0)
    world = 2
    halves = [kd_loss(s[i::2], t[i::2], 4.0, denominator=8 / world) for i in range(world)]
    assert (sum(halves) / world).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-6)


def test_weight_decay_only_on_weights():
    net = ConvNet(3, 16)
    groups = param_groups(net, 0.01)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in decayed}
    assert names == {"features.0.weight", "features.4.weight", "features.8.weight", "classifier.weight"}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    # With zero gradients, AdamW moves only the decayed tensors: w <- w (1 - lr wd).
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        want = before[n] * (1 - 0.1 * 0.01) if n in names else before[n]
        torch.testing.assert_close(p.detach(), want)


def test_cosine_factor():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


def test_crop_boxes_follow_the_random_resized_crop_rule():
    p = draw_augment(np.random.default_rng(0), 4000, scale=(0.08, 1.0), cutmix_alpha=0.0)
    top, left, h, w = p.boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-12).all() and (left + w <= 1 + 1e-12).all()
    area = h * w
    assert area.min() >= 0.08 - 1e-9 and area.max() <= 1 + 1e-9
    assert (w / h >= 3 / 4 - 1e-9).all() and (w / h <= 4 / 3 + 1e-9).all()
    assert 0.45 < p.flip.mean() < 0.55
    assert sorted(p.partner.tolist()) == list(range(4000))


def test_crop_resize_of_an_aligned_box_is_the_slice():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    boxes = np.array([[0.25, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    p = AugmentParams(boxes, np.array([False, True]), np.array([0, 1]), np.zeros(4))
    out = apply_augment(x, p, np.array([0, 1]), 4)
    torch.testing.assert_close(out[0], x[0, :, 2:6, 4:8])  # the box's pixels, resized 4 -> 4
    # Whole image, 8 -> 4 bilinear at align_corners=False: each output pixel averages a 2x2 block; flipped.
    pooled = torch.nn.functional.avg_pool2d(x[1:2], 2)[0]
    torch.testing.assert_close(out[1], pooled.flip(-1))


def test_cutmix_pastes_the_partners_box():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 8, 8, generator=g)
    whole = np.tile([0.0, 0.0, 1.0, 1.0], (4, 1))
    p = AugmentParams(whole, np.zeros(4, bool), np.array([2, 3, 0, 1]), np.array([0.25, 0.5, 0.5, 0.5]))
    out = apply_augment(x, p, np.arange(4), 8)
    for i, j in enumerate([2, 3, 0, 1]):
        want = x[i].clone()
        want[:, 2:6, 4:8] = x[j, :, 2:6, 4:8]
        torch.testing.assert_close(out[i], want)


def test_cutmix_box_area_is_one_minus_lambda_on_average():
    rng = np.random.default_rng(3)
    areas = [draw_augment(rng, 2).cut[2:].prod() for _ in range(4000)]
    # lambda ~ U(0, 1): the unclipped box covers 1 - lambda, mean 1/2; clipping at the border only shrinks it.
    assert 0.25 < np.mean(areas) < 0.5
    # Beta(1, 1) is symmetric, so the mean cannot tell 1 - lambda from lambda or a wrong side: pin lambda
    # near 1/2 (Beta(a, a), a large) and look at unclipped boxes: area 1 - lambda ~ 0.5, side sqrt(0.5).
    tight = [draw_augment(rng, 2, cutmix_alpha=2000.0).cut for _ in range(2000)]
    unclipped = [c[2] * c[3] for c in tight if c[0] > 0 and c[1] > 0 and c[0] + c[2] < 1 and c[1] + c[3] < 1]
    assert len(unclipped) > 50
    assert np.allclose(unclipped, 0.5, atol=0.04)


def test_workers_see_the_same_augmentation_as_one_worker():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(10, 3, 8, 8, generator=g)
    outs = {}
    for world in (1, 2, 3):
        per_rank = []
        for rank in range(world):
            rng = np.random.default_rng([7, 0])
            chunks = []
            for idx, rows in batch_plan(10, 4, rng, rank, world):
                chunks.append((idx[rows], apply_augment(x[idx], draw_augment(rng, len(idx)), rows, 6)))
            per_rank.append(chunks)
        # Reassemble each global batch from the ranks' pieces, in order.
        merged = [torch.cat([per_rank[r][b][1] for r in range(world)]) for b in range(len(per_rank[0]))]
        order = [np.concatenate([per_rank[r][b][0] for r in range(world)]) for b in range(len(per_rank[0]))]
        outs[world] = (merged, order)
    for world in (2, 3):
        # A tail batch smaller than the world is left out (batch_plan): 3 workers see the first 2 of 3 batches.
        assert len(outs[world][0]) == (3 if world == 2 else 2)
        for a, b in zip(outs[1][0], outs[world][0], strict=False):
            torch.testing.assert_close(a, b)
        for a, b in zip(outs[1][1], outs[world][1], strict=False):
            np.testing.assert_array_equal(a, b)


def test_topk_and_normalize():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, ks=(1, 2, 5)) == [1, 2, 3]
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(
        normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5])
    )


def test_mix_targets_weight_each_target_by_the_pixels_it_covers():
    """Images of constant value i: the share of pixels showing the partner's value is the partner's weight."""
    from d3hr_ray.training.protocol import cut_box, mix_targets

    rng = np.random.default_rng(5)
    n, size = 6, 8
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    whole = np.tile([0.0, 0.0, 1.0, 1.0], (n, 1))
    targets = torch.softmax(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), 1)
    seen_cut = 0
    for _ in range(30):
        p = draw_augment(rng, n)
        p = AugmentParams(whole, np.zeros(n, bool), p.partner, p.cut)
        rows = np.arange(n)
        out = apply_augment(x, p, rows, size)
        mixed = mix_targets(targets, p, rows, size)
        for i in rows:
            j = int(p.partner[i])
            share = float((out[i] == j).float().mean()) if j != i else 0.0
            want = (1 - share) * targets[i] + share * targets[j] if j != i else targets[i]
            torch.testing.assert_close(mixed[i], want.float(), rtol=1e-5, atol=1e-6)
        seen_cut += cut_box(p, size) is not None
    assert seen_cut > 20  # most batches did paste a box


def test_soft_cross_entropy_is_the_hard_label_cutmix_loss():
    from d3hr_ray.training.protocol import soft_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, generator=g) * 3
    a, b = torch.tensor([0, 3, 6, 2, 2]), torch.tensor([1, 3, 0, 5, 4])
    lam = 0.3
    logp = _np_log_softmax(logits.double().numpy())
    want = -(lam * logp[np.arange(5), a.numpy()] + (1 - lam) * logp[np.arange(5), b.numpy()]).sum() / 5
    onehot = lambda y: torch.nn.functional.one_hot(y, 7).float()  # noqa: E731
    got = soft_cross_entropy(logits, lam * onehot(a) + (1 - lam) * onehot(b))
    assert got.item() == pytest.approx(want, rel=1e-5)
    plain = torch.nn.functional.cross_entropy(logits, a)
    assert soft_cross_entropy(logits, onehot(a)).item() == pytest.approx(plain.item(), rel=1e-6)
