"""Benchmarks: `python -m d3hr_ray.bench <name> [options]`. Numbers go to docs/performance.md."""
