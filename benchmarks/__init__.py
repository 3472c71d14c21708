"""Performance benchmarks of d3hr_ray, outside the installed package: `python -m benchmarks <name>` from the
repository root. Their numbers go to docs/performance.md with machine, date and versions."""
