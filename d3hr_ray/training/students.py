"""Student (and teacher) architectures by name: name -> constructor(num_classes, resolution), default lr.

    conv3              ConvNet-W128-D3 of the dataset-distillation literature: 3 x [conv 3x3 (128), instance
                       norm (GroupNorm with a group per channel, affine), ReLU, 2x2 average pool], linear head
    resnet18_modified  ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool
    resnet18/50/101, mobilenet_v2, efficientnet_b0, vgg11: torchvision's, randomly initialised

Default learning rates are docs/method.md's (`training/choices.py`, with the names: the configs read them there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from d3hr_ray.training.choices import STUDENT_LRS

__all__ = ["STUDENTS", "ConvNet", "Student", "build_student"]


class ConvNet(nn.Module):
    """ConvNet-W{width}-D{depth}: input (B, 3, R, R) float32 -> logits (B, num_classes); R >= 2 ** depth."""

    def __init__(self, num_classes: int, resolution: int, width: int = 128, depth: int = 3):
        super().__init__()
        if resolution < 2**depth:
            raise ValueError(f"conv{depth} needs images of at least {2**depth} px, got {resolution}")
        layers, c, r = [], 3, resolution
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            c, r = width, r // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * r * r, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _tv(name: str) -> Callable[[int, int], nn.Module]:
    def make(num_classes: int, resolution: int) -> nn.Module:
        import torchvision.models  # here: torchvision loads torch._dynamo, ~2.5 s of CPU in every fresh worker process

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return make


def _resnet18_modified(num_classes: int, resolution: int) -> nn.Module:
    import torchvision.models  # as in _tv

    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


@dataclass(frozen=True)
class Student:
    make: Callable[[int, int], nn.Module]
    lr: float


_MAKERS: dict[str, Callable[[int, int], nn.Module]] = {
    "conv3": lambda k, r: ConvNet(k, r),
    "resnet18": _tv("resnet18"),
    "resnet18_modified": _resnet18_modified,
    "resnet50": _tv("resnet50"),
    "resnet101": _tv("resnet101"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "vgg11": _tv("vgg11"),
}
# Registry: name -> constructor and default learning rate (the names and rates: training/choices.py).
STUDENTS: dict[str, Student] = {name: Student(make, STUDENT_LRS[name]) for name, make in _MAKERS.items()}


def build_student(name: str, num_classes: int, resolution: int) -> nn.Module:
    """A freshly initialised network from the registry; ValueError naming the choices otherwise."""
    if name not in STUDENTS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(STUDENTS)}")
    return STUDENTS[name].make(num_classes, resolution)
