"""The frozen trunk every probe reads, and the features it gives.

The trunk is torchvision's ResNet-18 without ``fc``, in eval mode (BatchNorm uses the running
statistics pre-training left, as a detector would start from). Random init is seeded by the
probe seed, so the random-init row has a seed spread like every other row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from benchmark.config import STAGE_NAMES as STAGES
from benchmark.transfer.model import load_trunk_weights


def build_trunk(weights: str | Path | None, seed: int, device: torch.device) -> nn.Module:
    """ResNet-18 without ``fc``: ``weights`` (a torchvision-format backbone) or, without
    weights, torchvision's random init under ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = resnet18(weights=None)
    trunk.fc = nn.Identity()
    if weights is not None:
        load_trunk_weights(trunk, weights)
    trunk.requires_grad_(False)
    return trunk.eval().to(device)


def stage_maps(trunk: nn.Module, images: Tensor, stages: Sequence[str]) -> dict[str, Tensor]:
    """The feature maps of ``stages`` for a batch of normalised images."""
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    out: dict[str, Tensor] = {}
    for name in STAGES:
        x = getattr(trunk, name)(x)
        if name in stages:
            out[name] = x
        if len(out) == len(stages):
            break
    return out


@torch.inference_mode()
def pooled_features(
    trunk: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Global-average-pooled layer4 features (N, 512) in float32 on the CPU, and the labels."""
    feats, labels = [], []
    for images, targets in batches:
        feats.append(trunk(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)
