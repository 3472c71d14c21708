"""`python -m benchmarks <name> ...` (from the repository root): run one benchmark (see `--help`)."""

from __future__ import annotations

import argparse
import sys

from benchmarks import distill, gpu, memory, resume, s3, selection, state

# Registry: benchmark name -> module with add_arguments(parser) and run(args).
BENCHMARKS = {
    "selection": selection,
    "distill": distill,
    "resume": resume,
    "gpu": gpu,
    "memory": memory,
    "state": state,
    "s3": s3,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    for name, mod in BENCHMARKS.items():
        mod.add_arguments(sub.add_parser(name, help=mod.__doc__.splitlines()[0], description=mod.__doc__))
    args = parser.parse_args(argv)
    return BENCHMARKS[args.name].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
