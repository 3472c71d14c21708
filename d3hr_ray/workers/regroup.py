"""Parts back into wholes: the rows a Ray Data stage emits, in whatever order its actors finish, regrouped.

A shard's sub-batches and a class's images arrive as separate rows, interleaved with other shards' and
classes'. `complete_groups` holds the parts of each unfinished group and yields a group as soon as all
of its parts have arrived, its parts in part order (so what is built from them never depends on the
order the actors finished in). Memory: the parts of the groups still in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["complete_groups"]


def complete_groups(parts: Iterable[tuple[int, int, int, Any]]) -> Iterator[tuple[int, list]]:
    """(group, [part 0, part 1, ..., part n-1]) for every group whose n parts have all arrived.

    Args:
        parts: (group id, part index, number of parts in its group, the part) in any order.
    Raises:
        ValueError: a part index outside 0..n-1, a part seen twice, or groups left incomplete at the end.
    """
    pending: dict[int, dict[int, Any]] = {}
    for group, index, count, value in parts:
        got = pending.setdefault(group, {})
        if not 0 <= index < count or index in got:
            raise ValueError(f"group {group}: part {index} of {count} is out of range or seen twice")
        got[index] = value
        if len(got) == count:
            del pending[group]
            yield group, [got[i] for i in range(count)]
    if pending:
        first = min(pending)
        raise ValueError(f"{len(pending)} group(s) ended incomplete (first: {first}, {len(pending[first])} part(s))")
