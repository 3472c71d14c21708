"""Coreset rules against loops written here, and the per-class spill against an in-memory grouping."""

import itertools

import numpy as np
import pytest
import torch

from d3hr_ray.evaluation.coresets import ClassSpill, herding, k_center, select_coreset


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_herding_matches_a_plain_greedy_loop():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6)).astype(np.float32)
    u = _unit(feats)
    mu = u.mean(axis=0)
    chosen, total = [], np.zeros(6)
    for step in range(8):
        best, best_d = None, None
        for i in range(len(u)):
            if i in chosen:
                continue
            d = float(np.sum((mu - (total + u[i]) / (step + 1)) ** 2))
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
        total += u[best]
    assert herding(torch.from_numpy(feats), 8, seed=123) == chosen
    # The chosen mean is closer to the class mean than the mean of any random 8 rows, almost always.
    herd_gap = np.linalg.norm(u[chosen].mean(0) - mu)
    random_gaps = [np.linalg.norm(u[rng.choice(40, 8, replace=False)].mean(0) - mu) for _ in range(200)]
    assert herd_gap < np.percentile(random_gaps, 1)


def test_k_center_matches_a_plain_loop_and_is_within_twice_the_best_radius():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(12, 3)).astype(np.float32)
    u = _unit(feats)
    dist = np.linalg.norm(u[:, None] - u[None], axis=2)
    first = int(np.random.default_rng(7).integers(12))
    chosen = [first]
    while len(chosen) < 4:
        far = max(range(12), key=lambda i: (min(dist[i, c] for c in chosen), -i))
        chosen.append(far)
    assert k_center(torch.from_numpy(feats), 4, seed=7) == chosen

    def radius(centres):
        return max(min(dist[i, c] for c in centres) for i in range(12))

    best = min(radius(c) for c in itertools.combinations(range(12), 4))
    assert radius(chosen) <= 2 * best + 1e-12  # the greedy rule's guarantee (Gonzalez 1985)


def test_coresets_do_not_depend_on_the_order_rows_arrive_in():
    rng = np.random.default_rng(2)
    keys = [f"img{i:03d}.png" for i in range(30)]
    feats = rng.normal(size=(30, 5)).astype(np.float32)
    perm = rng.permutation(30)
    for rule in ("herding", "k-center"):
        a = [keys[i] for i in select_coreset(rule, keys, feats, 5, seed=3, class_id=2)]
        b = [keys[perm[i]] for i in select_coreset(rule, [keys[i] for i in perm], feats[perm], 5, seed=3, class_id=2)]
        assert a == b and len(set(a)) == 5
    other = [keys[i] for i in select_coreset("k-center", keys, feats, 5, seed=4, class_id=2)]
    assert other != [keys[i] for i in select_coreset("k-center", keys, feats, 5, seed=3, class_id=2)]  # seeded
    with pytest.raises(ValueError, match="herding"):
        select_coreset("kmeans", keys, feats, 5, seed=0, class_id=0)
    assert len(select_coreset("herding", keys[:3], feats[:3], 5, seed=0, class_id=0)) == 3  # fewer rows than k


def test_class_spill_groups_rows_by_class(tmp_path):
    rng = np.random.default_rng(3)
    spill = ClassSpill(str(tmp_path / "spill"))
    labels, vectors, values = [], [], []
    for b in range(5):
        lab = rng.integers(0, 4, size=7)
        vec = rng.normal(size=(7, 3)).astype(np.float32)
        val = [[f"k{b}-{i}", b] for i in range(7)]
        spill.add(lab, vec, val)
        labels += lab.tolist()
        vectors.append(vec)
        values += val
    vectors = np.concatenate(vectors)
    assert spill.classes() == sorted(set(labels))
    for c in spill.classes():
        got_values, got_vectors = spill.load(c)
        rows = [i for i, y in enumerate(labels) if y == c]
        assert got_values == [values[i] for i in rows]
        np.testing.assert_array_equal(got_vectors, vectors[rows])
    with pytest.raises(ValueError, match="width"):
        spill.add(np.zeros(1, int), np.zeros((1, 4), np.float32), [["x", 0]])
