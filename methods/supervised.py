"""Supervised pre-training: the reference row that pathology SSL papers report beside SSL.

Not part of ConCL's table: the paper compares SSL methods with each other and with random
initialisation. Pathology SSL studies commonly also report a network trained with labels, which
says how much of the gap between no pre-training and labels SSL closes. Here that is a ResNet-18
trained with cross-entropy on the tissue class of each pre-training image (its class folder:
NCT's nine tissue types, or the synthetic set's), with the SSL methods' budget, batch and
schedule: SGD lr 0.03 at batch 256, momentum 0.9, weight decay 1e-4, cosine per epoch (MoCo-v2's,
set in ``experiments/paper/supervised.yaml``).

Views: one per image, MoCo-v2's augmentation (crop from 0.2, jitter, grayscale, blur, flip), the
common SSL recipe, so the row differs from MoCo-v2's in the objective and not in the data seen.
BatchNorm normalises groups of ``bn_batch_size`` images (``SplitBatchNorm2d``), as the MoCo family
does, so one process normalises like the original 8 GPUs × 32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.core.contracts import BuildContext, StepContext
from benchmark.core.registry import register_method
from methods.augment import MultiView, moco_v2_view
from methods.backbones import build_trunk
from methods.base import Method, MethodConfig
from methods.shuffle_bn import convert_split_bn


@dataclass
class SupervisedConfig(MethodConfig):
    """The architecture only: the number of classes is the data's (``BuildContext``)."""

    name: str = "supervised"
    depth: int = 18


@register_method("supervised")
class Supervised(Method):
    """ResNet trained with cross-entropy on the tissue labels (the supervised reference)."""

    config_class = SupervisedConfig
    cfg: SupervisedConfig
    wants_labels = True

    def __init__(self, cfg: SupervisedConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        if build.num_classes is None or build.num_classes < 2:
            raise ValueError(
                f"the supervised method needs at least 2 classes, got {build.num_classes}: "
                "the pre-training images must lie in two or more class folders"
            )
        self.trunk = convert_split_bn(build_trunk(cfg.depth), build.bn_splits)
        # PyTorch's default Linear init, as torchvision's ResNet ``fc``.
        self.classifier = nn.Linear(self.trunk.out_channels, build.num_classes)

    def views(self) -> Callable[[Any], list[Tensor]]:
        return MultiView([moco_v2_view(self.build_ctx.image_size)])

    def logits(self, images: Tensor) -> Tensor:
        """Class scores (B, num_classes) of globally pooled layer4 features, in float32."""
        return self.classifier(self.trunk(images).mean(dim=(2, 3))).float()

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        """Cross-entropy and top-1 accuracy (percent) of the batch; the loader passes
        ``[images, labels]``."""
        images, labels = views
        logits = self.logits(images)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean() * 100
        return {"loss": F.cross_entropy(logits, labels), "accuracy": accuracy}

    def backbone(self) -> nn.Module:
        return self.trunk
