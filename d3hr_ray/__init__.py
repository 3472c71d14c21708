"""d3hr_ray: dataset distillation with D3HR (Zhao et al., ICML 2025), on Ray.

The method lives in plain torch functions (no Ray in this layer), one stage per module under
`d3hr_ray.stages`:

    encode -> invert -> ClassStats -> select_group -> sample -> decode

    >>> import torch, d3hr_ray as d3
    >>> pipe = d3.build_pipeline(num_classes=10)                     # or d3.load_pipeline("s3://...")
    >>> x = torch.rand(4, 3, 8, 8) * 2 - 1                             # (B, 3, R, R) in [-1, 1]
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> zK = d3.invert(pipe, d3.encode(pipe, x, mode="mean"), y, steps=50, inversion_step=30)
"""

from d3hr_ray.models.build import build_pipeline
from d3hr_ray.models.loading import ModelSourceError, load_pipeline
from d3hr_ray.seeding import derive_seed
from d3hr_ray.stages.diffusion import ModelSpec
from d3hr_ray.stages.encode import decode, encode
from d3hr_ray.stages.generate import sample
from d3hr_ray.stages.invert import invert
from d3hr_ray.stages.select import group_score, select_group
from d3hr_ray.stages.stats import ClassStats

__version__ = "0.1.0"

__all__ = [
    "ClassStats",
    "ModelSourceError",
    "ModelSpec",
    "__version__",
    "build_pipeline",
    "decode",
    "derive_seed",
    "encode",
    "group_score",
    "invert",
    "load_pipeline",
    "sample",
    "select_group",
]
