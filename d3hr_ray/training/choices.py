"""The names a user passes to the evaluation jobs, torch-free so that their configs parse without it.

The constructors behind them are in `students.py` and `coresets.py`, whose registries use these keys
(tests/training/test_choices.py holds them equal).
"""

__all__ = ["CORESET_RULES", "STUDENT_LRS"]

# Student (and teacher) architectures and their default AdamW learning rates: docs/method.md's (ResNets 1e-3,
# MobileNet-V2 2.5e-3, EfficientNet-B0 2e-3, VGG-11 5e-4); conv3 is not in that list and uses 1e-3.
STUDENT_LRS = {
    "conv3": 1e-3,
    "resnet18": 1e-3,
    "resnet18_modified": 1e-3,
    "resnet50": 1e-3,
    "resnet101": 1e-3,
    "mobilenet_v2": 2.5e-3,
    "efficientnet_b0": 2e-3,
    "vgg11": 5e-4,
}
# The coreset baselines of `evaluate --baseline`.
CORESET_RULES = ("herding", "k-center")
