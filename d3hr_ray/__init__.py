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

import importlib

# Names resolve on first use (PEP 562): `import d3hr_ray.data.sources` (what Ray's read tasks run)
# must not pay for torch, which the method's stages import. Each name -> its module.
_EXPORTS = {
    "build_pipeline": "d3hr_ray.models.build",
    "ModelSourceError": "d3hr_ray.models.sources",
    "load_pipeline": "d3hr_ray.models.loading",
    "derive_seed": "d3hr_ray.seeding",
    "ModelSpec": "d3hr_ray.stages.diffusion",
    "decode": "d3hr_ray.stages.encode",
    "encode": "d3hr_ray.stages.encode",
    "sample": "d3hr_ray.stages.generate",
    "invert": "d3hr_ray.stages.invert",
    "group_score": "d3hr_ray.stages.select",
    "select_group": "d3hr_ray.stages.select",
    "ClassStats": "d3hr_ray.stages.stats",
}


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd3hr_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
