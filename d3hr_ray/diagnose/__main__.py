"""`python -m d3hr_ray.diagnose <name> ...`: run one diagnostic (see `--help`; the list is in __init__)."""

from __future__ import annotations

import argparse
import sys

from d3hr_ray.diagnose import agreement, compare, figure, latents, sets

# Registry: diagnostic name -> module with add_arguments(parser) and run(args).
DIAGNOSTICS = {"agreement": agreement, "sets": sets, "latents": latents, "figure": figure, "compare": compare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m d3hr_ray.diagnose",
        description=sys.modules["d3hr_ray.diagnose"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="name", required=True)
    for name, mod in DIAGNOSTICS.items():
        mod.add_arguments(
            sub.add_parser(
                name,
                help=(mod.__doc__ or name).splitlines()[0],
                description=mod.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    args = parser.parse_args(argv)
    return DIAGNOSTICS[args.name].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
