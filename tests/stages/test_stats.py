"""Stage 3: streaming, mergeable class statistics against a one-pass numpy computation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d3hr_ray import ClassStats


def ref_stats(x: np.ndarray, y: np.ndarray, c: int):
    """Per-class count, mean, unbiased variance in one pass over all the data (numpy, float64)."""
    count = np.array([(y == k).sum() for k in range(c)])
    mean = np.stack([x[y == k].mean(0) if count[k] else np.zeros(x.shape[1]) for k in range(c)])
    var = np.stack([x[y == k].var(0, ddof=1) if count[k] > 1 else np.zeros(x.shape[1]) for k in range(c)])
    return count, mean, var


@st.composite
def partitioned_data(draw):
    c = draw(st.integers(1, 4))
    d = draw(st.integers(1, 5))
    per_class = draw(st.lists(st.integers(2, 9), min_size=c, max_size=c))
    n = sum(per_class)
    y = np.repeat(np.arange(c), per_class)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Offsets far from zero and mixed scales: where naive sum-of-squares formulas lose digits.
    x = rng.normal(size=(n, d)) * draw(st.sampled_from([1e-3, 1.0, 50.0])) + draw(st.sampled_from([0.0, 1e3, -7e4]))
    perm = rng.permutation(n)
    x, y = x[perm], y[perm]
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    parts = [(a, b) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    order = draw(st.permutations(range(len(parts))))
    return c, d, x, y, parts, list(order)


@settings(max_examples=60, deadline=None)
@given(partitioned_data(), st.booleans())
def test_any_partition_merged_in_any_order_equals_one_pass(data, tree):
    c, d, x, y, parts, order = data
    partials = []
    for a, b in parts:
        s = ClassStats(c, d)
        s.update(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b]))  # empty parts included
        partials.append(s)
    partials = [partials[i] for i in order]
    if tree:  # pairwise, as a distributed reduction would
        while len(partials) > 1:
            partials = [p.merge(q) for p, q in zip(partials[::2], partials[1::2], strict=False)] + (
                [partials[-1]] if len(partials) % 2 else []
            )
        total = partials[0]
    else:  # left fold
        total = ClassStats(c, d)
        for p in partials:
            total.merge(p)
    count, mean, var = ref_stats(x, y, c)
    np.testing.assert_array_equal(total.count.numpy(), count)
    np.testing.assert_allclose(total.mean.numpy(), mean, rtol=1e-9, atol=1e-9 * np.abs(x).max())
    np.testing.assert_allclose(total.var.numpy(), var, rtol=1e-7, atol=1e-12)
    assert total.mean.dtype == torch.float64 and total.var.dtype == torch.float64


def test_float32_latents_accumulate_in_float64():
    """A million-sample class with a large offset: float64 accumulators keep 1e-5 relative accuracy."""
    rng = np.random.default_rng(0)
    s = ClassStats(1, 3)
    ref_sum = np.zeros(3)
    ref_sq = np.zeros(3)
    n = 0
    for _ in range(20):
        x = (rng.normal(size=(50_000, 3)) * 0.01 + 300.0).astype(np.float32)
        s.update(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64))
        xd = x.astype(np.float64)
        ref_sum += xd.sum(0)
        n += len(x)
        ref_sq += ((xd - 300.0) ** 2).sum(0)
    mean = ref_sum / n
    var = (ref_sq - n * (mean - 300.0) ** 2) / (n - 1)
    np.testing.assert_allclose(s.mean.numpy()[0], mean, rtol=1e-12)
    np.testing.assert_allclose(s.var.numpy()[0], var, rtol=1e-5)


def test_too_few_samples_names_the_class():
    s = ClassStats(3, 2, class_names=["cat", "dog", "emu"])
    s.update(torch.randn(5, 2), torch.tensor([0, 0, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"class 1 \('dog'\): 1 sample"):
        _ = s.var
    assert s.mean.shape == (3, 2)  # a mean needs only one sample
    empty = ClassStats(2, 2)
    empty.update(torch.randn(2, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="class 0: 0 sample"):
        _ = empty.mean


def test_state_round_trips_through_safetensors(tmp_path):
    s = ClassStats(4, 6, class_names=list("abcd"))
    s.update(torch.randn(40, 6, dtype=torch.float64), torch.arange(40) % 4)
    s.save(tmp_path / "stats.safetensors", metadata={"timestep": "600"})
    back = ClassStats.load(tmp_path / "stats.safetensors")
    for k, v in s.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert back.class_names == list("abcd")
    assert torch.equal(back.var, s.var)


def test_bad_input_is_refused():
    s = ClassStats(2, 3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        s.update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        s.update(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        s.update(torch.tensor([[0.0, float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot merge"):
        s.merge(ClassStats(2, 4))


def test_sparse_partials_merge_like_full_ones():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4)) + 10
    y = rng.integers(0, 6, size=30)
    y[y == 2] = 3  # class 2 never appears: partials leave it out
    a, b = ClassStats(6, 4), ClassStats(6, 4)
    a.update(torch.from_numpy(x[:11]), torch.from_numpy(y[:11]))
    b.update(torch.from_numpy(x[11:]), torch.from_numpy(y[11:]))
    part = b.to_partial()
    assert 2 not in part["classes"].tolist() and part["mean"].shape[0] == len(part["classes"])
    total = ClassStats(6, 4).merge_partial(a.to_partial()).merge_partial(part)
    count, mean, var = ref_stats(x, y, 6)
    np.testing.assert_array_equal(total.count.numpy(), count)
    seen = count > 1
    with pytest.raises(ValueError, match="class 2: 0 sample"):
        _ = total.var  # the empty class is named, not returned as zeros
    state = total.state_dict()
    np.testing.assert_allclose((state["m2"][seen] / (state["count"][seen, None] - 1)).numpy(), var[seen], rtol=1e-9)
    np.testing.assert_allclose(state["mean"][count > 0].numpy(), mean[count > 0], rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(partitioned_data())
def test_sparse_merge_of_partials_equals_one_pass_over_their_classes(data):
    """merge_partials touches only the classes present; the result equals numpy over the same rows."""
    from d3hr_ray.stages.stats import merge_partials

    c, d, x, y, parts, _ = data
    partials = [
        ClassStats(c, d).update(torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b])).to_partial() for a, b in parts
    ]
    merged = merge_partials(partials, d)
    present = sorted(set(y.tolist()))
    assert merged["classes"].tolist() == present
    count, mean, var = ref_stats(x, y, c)
    np.testing.assert_array_equal(merged["count"].numpy(), count[present])
    np.testing.assert_allclose(merged["mean"].numpy(), mean[present], rtol=1e-9, atol=1e-9 * (1 + np.abs(x).max()))
    m2 = var[present] * (count[present] - 1)[:, None]
    np.testing.assert_allclose(merged["m2"].numpy(), m2, rtol=1e-7, atol=1e-9 * (1 + m2.max()))


def test_merge_of_no_partials_is_empty():
    from d3hr_ray.stages.stats import merge_partials

    assert merge_partials([], 3)["classes"].numel() == 0


def test_finalise_names_short_classes_and_zeroes_their_variance():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0], [7.0, 1.0]])
    y = np.array([0, 0, 0, 2])
    stats = ClassStats(3, 2).update(torch.from_numpy(x), torch.from_numpy(y))
    mean, var, short = stats.finalise([0, 1, 2])
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    np.testing.assert_allclose(mean[0].numpy(), x[:3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(var[0].numpy(), x[:3].var(0, ddof=1), rtol=1e-6)
    assert short == [1, 2]  # class 1: no sample; class 2: one sample
    assert var[1:].abs().sum() == 0
    assert stats.finalise([0])[2] == []


def test_partial_accumulator_folds_bit_for_bit_as_a_dense_class_stats_does_while_it_grows():
    """Parts over 40 classes arrive a few classes at a time (the capacity doubles from 8 to 64): every held class
    gets exactly the dense ClassStats's values, and only the classes seen are returned, in id order."""
    from d3hr_ray.stages.stats import PartialAccumulator

    g = torch.Generator().manual_seed(3)
    dense, acc = ClassStats(50, 5), PartialAccumulator(5)
    for i in range(12):
        y = torch.randint(i * 3, i * 3 + 6, (9,), generator=g)  # classes 0..38, a sliding window
        part = ClassStats(50, 5).update(torch.randn(9, 5, generator=g, dtype=torch.float64) * (i + 1), y).to_partial()
        dense.merge_partial(part)
        acc.add(part)
    out = acc.to_partial()
    seen = (dense.n > 0).nonzero().flatten()
    assert out["classes"].tolist() == seen.tolist() == sorted(out["classes"].tolist()) and len(acc) == len(seen)
    assert torch.equal(out["count"], dense.n[seen])
    assert torch.equal(out["mean"], dense.mu[seen]) and torch.equal(out["m2"], dense.m2[seen])
    assert acc.nbytes <= 2 * len(seen) * (8 + 16 * 5)


def test_batch_partial_is_a_dense_update_bit_for_bit_over_the_classes_present_only():
    from d3hr_ray.stages.stats import batch_partial

    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g) * 3 + 1
    y = torch.tensor([7, 2, 7, 19] * 10)
    got = batch_partial(x, y, 20)
    ref = ClassStats(20, 6).update(x, y).to_partial()
    assert got["classes"].tolist() == [2, 7, 19]
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # Against numpy, with a class count whose dense state would not fit in memory (10^9 x 6 x 8 bytes x 3).
    huge = batch_partial(x, y * 50_000_000, 1_000_000_000)
    assert huge["classes"].tolist() == [100_000_000, 350_000_000, 950_000_000]
    for row, c in enumerate((2, 7, 19)):
        rows = x[y == c].double().numpy()
        np.testing.assert_allclose(huge["mean"][row].numpy(), rows.mean(0), rtol=1e-12)
        np.testing.assert_allclose(huge["m2"][row].numpy(), ((rows - rows.mean(0)) ** 2).sum(0), rtol=1e-10)
    assert batch_partial(torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64), 20)["mean"].shape == (0, 6)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.19"):
        batch_partial(x, y + 1, 20)
