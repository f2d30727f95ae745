"""MoCo-v1 (He et al. 2020) as configured in ConCL's NCT pre-training.

TencentAILabHealthcare/ConCL ``configs/NCT_pretraining/moco_v1/r18_bs256_ep200.py``:
MoCo-v2's machinery (queue 16384, momentum 0.999, shuffle-BN) with MoCo-v1's linear head
512→128, τ 0.07 and MoCo-v1 augmentations. The step LR decay (×0.1 at epochs 120 and 160)
is the engine's, set in ``experiments/paper/mocov1.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from benchmark.core.registry import register_method
from methods.augment import MultiView, moco_v1_view
from methods.heads import LinearHead
from methods.mocov2 import MoCoConfig, MoCoV2


@dataclass
class MoCoV1Config(MoCoConfig):
    name: str = "mocov1"
    temperature: float = 0.07


@register_method("mocov1")
class MoCoV1(MoCoV2):
    """MoCo-v2's training step with a linear projector, τ 0.07 and MoCo-v1's views."""

    config_class = MoCoV1Config
    cfg: MoCoV1Config  # type: ignore[assignment]

    def build_head(self, in_dim: int) -> nn.Module:
        return LinearHead(in_dim, self.cfg.feat_dim)

    def views(self) -> Callable[[Any], list[Tensor]]:
        view = moco_v1_view(self.build_ctx.image_size)
        return MultiView([view, view])
