"""The ResNet trunk's stage maps, and that its layer4 path is torchvision's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from methods.backbones import STAGES, build_trunk


def _trunk_and_image() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    trunk = build_trunk(18).eval()
    return trunk, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_stem_is_conv1_bn1_relu_before_the_max_pool() -> None:
    # OpenSelfSup's ResNet.forward (TencentAILabHealthcare/ConCL
    # openselfsup/models/backbones/resnet.py) outputs f1 before self.maxpool: 64×112×112.
    trunk, x = _trunk_and_image()
    maps = trunk.forward_stages(x, STAGES)
    assert list(maps) == list(STAGES)
    shapes = {name: tuple(m.shape[1:]) for name, m in maps.items()}
    assert shapes == {
        "stem": (64, 112, 112),
        "layer1": (64, 56, 56),
        "layer2": (128, 28, 28),
        "layer3": (256, 14, 14),
        "layer4": (512, 7, 7),
    }
    stem = F.relu(trunk.bn1(trunk.conv1(x)))
    assert torch.equal(maps["stem"], stem)
    assert torch.equal(maps["layer1"], trunk.layer1(trunk.maxpool(stem)))
    assert list(trunk.forward_stages(x, ("stem",))) == ["stem"]


@torch.no_grad()
def test_layer4_is_torchvisions_resnet18_trunk() -> None:
    trunk, x = _trunk_and_image()
    net = torchvision.models.resnet18().eval()
    net.load_state_dict(trunk.state_dict(), strict=False)
    expected = nn.Sequential(*list(net.children())[:-2])(x)  # up to layer4, no pool or fc
    assert torch.equal(trunk(x), expected)
    assert torch.equal(trunk.forward_stages(x, ("layer3", "layer4"))["layer4"], expected)
