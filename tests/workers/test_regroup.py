"""workers/regroup.py: parts in any order come back as whole groups in part order, as soon as they are whole."""

import random

import pytest

from d3hr_ray.workers.regroup import complete_groups


def test_groups_are_yielded_when_whole_with_their_parts_in_order():
    sizes = {7: 3, 2: 1, 5: 4}
    parts = [(g, i, n, f"{g}.{i}") for g, n in sizes.items() for i in range(n)]
    random.Random(0).shuffle(parts)
    consumed = [0]

    def stream():
        for p in parts:
            consumed[0] += 1
            yield p

    out = []
    for group, items in complete_groups(stream()):
        last = max(k for k, p in enumerate(parts) if p[0] == group)
        assert consumed[0] == last + 1  # yielded right after its last part arrived, not at the end
        out.append((group, items))
    assert sorted(out) == sorted((g, [f"{g}.{i}" for i in range(n)]) for g, n in sizes.items())


def test_bad_or_missing_parts_are_errors():
    with pytest.raises(ValueError, match="seen twice"):
        list(complete_groups([(1, 0, 2, "a"), (1, 0, 2, "b")]))
    with pytest.raises(ValueError, match="out of range"):
        list(complete_groups([(1, 2, 2, "a")]))
    with pytest.raises(ValueError, match="incomplete.*first: 4"):
        list(complete_groups([(4, 0, 2, "a"), (1, 0, 1, "b")]))
