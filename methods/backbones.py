"""ResNet trunks whose ``state_dict`` is exactly torchvision's ResNet minus ``fc``."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

#: Stage names in the order the trunk computes them. "stem" is conv1 → bn1 → relu *before*
#: the max-pool (stride 2: 64×112×112 for ResNet-18 at 224 px), as the first output f1 of
#: OpenSelfSup's ``ResNet.forward`` (TencentAILabHealthcare/ConCL
#: ``openselfsup/models/backbones/resnet.py``), which ConCL's ``cluster_indice=0`` selects.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class ResNetTrunk(resnet.ResNet):
    """torchvision ResNet without ``avgpool``/``fc`` that returns stage feature maps.

    Keeping torchvision's module names means the exported ``state_dict`` loads straight
    into ``torchvision.models.resnet18()`` (only ``fc.*`` missing) and into detection
    backbones, with no key renaming.
    """

    def __init__(self, depth: int = 18, zero_init_residual: bool = False) -> None:
        block, layers = _SPECS[depth]
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        del self.fc
        del self.avgpool
        self.depth = depth
        self.out_channels = 512 * block.expansion
        # OpenSelfSup's ResNet: kaiming(fan_in, relu) for convs; BN gamma=1, beta=0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward_stages(self, x: Tensor, stages: tuple[str, ...] = ("layer4",)) -> dict[str, Tensor]:
        """Feature maps of the requested stages; stops after the deepest one asked for.

        "stem" is the map before the max-pool, so layer1 (after it) has half its size.
        """
        out: dict[str, Tensor] = {}
        last = max(STAGES.index(s) for s in stages)
        x = self.relu(self.bn1(self.conv1(x)))
        if "stem" in stages:
            out["stem"] = x
        if last == 0:
            return out
        x = self.maxpool(x)
        for name in STAGES[1 : last + 1]:
            x = getattr(self, name)(x)
            if name in stages:
                out[name] = x
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The layer4 map (B, C, H/32, W/32), before global pooling."""
        return self.forward_stages(x, ("layer4",))["layer4"]


_SPECS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
}


def build_trunk(depth: int = 18) -> ResNetTrunk:
    if depth not in _SPECS:
        raise ValueError(f"ResNet depth {depth} is not supported; use one of {sorted(_SPECS)}")
    return ResNetTrunk(depth)
