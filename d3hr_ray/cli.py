"""One error policy for every command line (distill, finetune, train_teacher, evaluate).

    exit 0   the job ran; the command prints its summary
    exit 2   a configuration error: a bad flag or YAML key, or a flag that contradicts the inputs
             (`ConfigError`, which names the flag; argparse's own usage errors exit 2 as well)
    exit 1   a user error: a missing or unreadable input, an empty data set, an unwritable output
             (`ValueError`, `OSError` such as FileNotFoundError, and the job's own error classes)

Both errors print one line, `error: <message>`, on stderr and no traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from d3hr_ray.errors import JobError
from d3hr_ray.flags import ConfigError, config_from_args

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_USER", "USER_ERRORS", "JobError", "fail", "main_for"]


# A job's config (a frozen dataclass) and what its run returns.
C = TypeVar("C")
R = TypeVar("R")

EXIT_OK = 0
EXIT_USER = 1
EXIT_CONFIG = 2
# What a user can get wrong, as the core raises it (STYLE: ValueError / FileNotFoundError with an
# actionable message); OSError also covers permissions and unreachable storage. ConfigError is a
# ValueError and is caught first.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, JobError)


def fail(error: BaseException, code: int) -> int:
    """Print `error: <message>` as one line on stderr; return `code`.

    An error raised in a Ray task or actor arrives wrapped, its remote traceback in its text; its
    `cause` is the error the user should read.
    """
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return code


def main_for(
    argv: Sequence[str] | None,
    *,
    cls: type[C],
    run: Callable[[C], R],
    report: Callable[[C, R], int | None],
    prog: str,
    description: str | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse flags (and --config YAML) into `cls`, run the job, print its summary; the exit code.

    Args:
        argv: the arguments (None: sys.argv[1:]).
        cls: the job's frozen config dataclass.
        run: the job, `run(cfg) -> result`.
        report: prints the summary, `report(cfg, result) -> exit code` (None means 0).
        prog, description: the help's header.
        user_errors: the job's own error classes, exit 1 like USER_ERRORS.
    """
    try:
        cfg = config_from_args(cls, None if argv is None else list(argv), prog=prog, description=description)
        result = run(cfg)
    except ConfigError as e:
        return fail(e, EXIT_CONFIG)
    except USER_ERRORS + tuple(user_errors) as e:
        return fail(e, EXIT_USER)
    code = report(cfg, result)
    return EXIT_OK if code is None else code
