"""`python -m d3hr_ray.bench <name> ...`: run one benchmark (see `--help`)."""

from __future__ import annotations

import argparse
import sys

from d3hr_ray.bench import agreement, distill, figure, gpu, latents, memory, resume, selection, sets

# Registry: benchmark name -> module with add_arguments(parser) and run(args).
BENCHMARKS = {"selection": selection, "distill": distill, "agreement": agreement, "resume": resume, "gpu": gpu, "memory": memory,
              "sets": sets, "latents": latents, "figure": figure}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d3hr_ray.bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    for name, mod in BENCHMARKS.items():
        mod.add_arguments(sub.add_parser(name, help=mod.__doc__.splitlines()[0], description=mod.__doc__))
    args = parser.parse_args(argv)
    return BENCHMARKS[args.name].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
