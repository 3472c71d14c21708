"""`python -m d3hr_ray` is `python -m d3hr_ray.distill`."""

import sys

from d3hr_ray.distill import main

sys.exit(main())
