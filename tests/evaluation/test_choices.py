"""evaluation/choices.py: the torch-free names the configs check are exactly the registries' keys."""

from d3hr_ray.evaluation.choices import CORESET_RULES, STUDENT_LRS
from d3hr_ray.evaluation.coresets import CORESETS
from d3hr_ray.evaluation.students import STUDENTS


def test_the_names_are_the_registries():
    assert list(STUDENTS) == list(STUDENT_LRS)
    assert all(STUDENTS[n].lr == STUDENT_LRS[n] for n in STUDENTS)
    assert tuple(CORESETS) == CORESET_RULES
    # D3HR.md's learning rates: ResNets 1e-3, MobileNet-V2 2.5e-3, EfficientNet-B0 2e-3, VGG-11 5e-4.
    assert (
        STUDENT_LRS["resnet18"],
        STUDENT_LRS["mobilenet_v2"],
        STUDENT_LRS["efficientnet_b0"],
        STUDENT_LRS["vgg11"],
    ) == (1e-3, 2.5e-3, 2e-3, 5e-4)
