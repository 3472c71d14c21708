"""The architecture registry: every name builds and classifies; conv3 and the CIFAR stem are what they claim."""

import re
from pathlib import Path

import pytest
import torch

from d3hr_ray.training.students import STUDENTS, ConvNet, build_student


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_every_student_builds_and_classifies(name):
    net = build_student(name, 7, 32).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_default_learning_rates_are_the_ones_docs_method_md_states():
    """Each torchvision student's default learning rate is the one docs/method.md gives its family (the protocol users
    read), parsed from its text here, not restated: "learning rate 1e-3 for ResNets, 2.5e-3 for MobileNet-V2, ..."."""
    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text().split())
    stated = re.search(r"learning rate ((?:[\d.e-]+ for [\w-]+(?:, | and )?)+)", text)
    assert stated, "docs/method.md no longer states the students' learning rates"

    def key(name: str) -> str:  # "ResNets" -> "resnet", "MobileNet-V2" and "mobilenet_v2" -> "mobilenetv2"
        return name.lower().replace("-", "").replace("_", "").removesuffix("s")

    by_family = {key(fam): float(lr) for lr, fam in re.findall(r"([\d.e-]+) for ([\w-]+)", stated[1])}
    assert set(by_family) == {"resnet", "mobilenetv2", "efficientnetb0", "vgg11"}, by_family
    for name, student in STUDENTS.items():
        if name != "conv3":  # not in the paper's list (training/choices.py gives it 1e-3)
            (family,) = [f for f in by_family if key(name).startswith(f)]
            assert student.lr == by_family[family], (name, family)


def test_conv3_is_convnet_w128_d3():
    net = ConvNet(10, 32)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 128, (3, 3)),
        (128, 128, (3, 3)),
        (128, 128, (3, 3)),
    ]
    # Parameters counted by hand: 3 convs with bias, 3 instance norms (scale + shift), a 128*4*4 -> 10 head.
    expected = (3 * 9 + 1) * 128 + 2 * (128 * 9 + 1) * 128 + 3 * 2 * 128 + (128 * 4 * 4 + 1) * 10
    assert sum(p.numel() for p in net.parameters()) == expected
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_groups == m.num_channels == 128 for m in norms)  # one group per channel: instance norm
    with pytest.raises(ValueError, match="at least 8 px"):
        ConvNet(10, 4)


def test_resnet18_modified_has_the_cifar_stem():
    net = build_student("resnet18_modified", 10, 32)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    feats = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    assert feats(torch.zeros(1, 3, 32, 32)).shape[-1] == 32  # no downsampling before layer2


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="conv3, resnet18"):
        build_student("resnet7", 10, 32)
