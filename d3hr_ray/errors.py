"""The job errors a user can act on; d3hr_ray.cli maps them to exit codes and one line on stderr."""

from __future__ import annotations

__all__ = ["JobError", "check_version"]


class JobError(RuntimeError):
    """A job's failure that the user can act on (a stage found missing work, a changed input): exit 1, one line."""


def check_version(found: object, newest: int, what: str) -> int:
    """`found`, the format version a file states, as an int; a ValueError naming `what` when this d3hr_ray cannot
    read it (newer than `newest`, or not a whole number). JSON files store the version as a number, safetensors
    metadata as its decimal string: both are accepted."""
    version = found if isinstance(found, int) else int(found) if isinstance(found, str) and found.isdigit() else None
    if version is None or isinstance(found, bool) or version > newest:
        raise ValueError(f"{what} has version {found!r}; this d3hr_ray reads versions 1 to {newest}: upgrade d3hr_ray")
    return version
