"""The job errors a user can act on; d3hr_ray.cli maps them to exit codes and one line on stderr."""

from __future__ import annotations

__all__ = ["JobError"]


class JobError(RuntimeError):
    """A job's failure that the user can act on (a stage found missing work, a changed input): exit 1, one line."""
