"""MoCo-v2 (Chen et al. 2020) as configured in ConCL's NCT pre-training.

TencentAILabHealthcare/ConCL ``configs/NCT_pretraining/moco_v2/r18_bs256_ep200.py``:
ResNet-18, MLP head 512→512→128, queue 16384, momentum 0.999, τ 0.2, shuffle-BN. The
engine supplies SGD (lr 0.03, momentum 0.9, wd 1e-4) and the per-epoch cosine schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.core.contracts import BuildContext, StepContext
from benchmark.core.registry import register_method
from methods.augment import MultiView, moco_v2_view
from methods.backbones import build_trunk
from methods.base import Method, MethodConfig
from methods.distributed import concat_all_gather
from methods.heads import MLPHead
from methods.losses import info_nce
from methods.momentum import ema_update_, momentum_copy
from methods.queue import MemoryQueue
from methods.shuffle_bn import batch_shuffle, batch_unshuffle, convert_split_bn

#: Whether and how ``MoCoV2.encode`` returns the key encoder's layer4 map.
KeyMap = Literal["none", "unshuffled", "shuffled"]
KEY_MAPS: tuple[str, ...] = ("none", "unshuffled", "shuffled")


@dataclass
class MoCoEncoding:
    """One MoCo encode step (``MoCoV2.encode``).

    ``q``, ``k``: (B, D) L2-normalised query and key projections in float32, both in batch
    order; ``q`` has gradient. ``feat_q``: the query encoder's layer4 map (B, C, h, w),
    with gradient. ``feat_k``: the key encoder's layer4 map, without gradient, in the
    order ``key_map`` asked for (None for ``"none"``).
    """

    q: Tensor
    k: Tensor
    feat_q: Tensor
    feat_k: Tensor | None


@dataclass
class MoCoConfig(MethodConfig):
    """What the MoCo family shares in ConCL's NCT configs (``moco_v1``, ``moco_v2``,
    ``densecl``, ``concl``): R18, queue 16384, momentum 0.999, shuffle-BN. Each version
    adds its head's widths, τ and name."""

    depth: int = 18
    feat_dim: int = 128
    queue_size: int = 16384
    momentum: float = 0.999
    temperature: float = 0.2
    shuffle_bn: bool = True


@dataclass
class MoCoV2Config(MoCoConfig):
    name: str = "mocov2"
    hidden_dim: int = 512


@register_method("mocov2")
class MoCoV2(Method):
    """Query encoder trained by InfoNCE against a momentum key encoder and a key queue.

    Both encoders are ``ModuleDict(backbone=trunk, head=build_head(...))``, the layout
    MoCo-v1, DenseCL and ConCL reuse. With ``build.bn_splits > 1`` their BatchNorms become
    ``SplitBatchNorm2d``, so BN sees groups of ``bn_batch_size`` images as on the original
    8 GPUs × 32.
    """

    config_class = MoCoV2Config
    cfg: MoCoV2Config

    def __init__(self, cfg: MoCoConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        trunk = build_trunk(cfg.depth)
        self.encoder_q = nn.ModuleDict(
            {"backbone": trunk, "head": self.build_head(trunk.out_channels)}
        )
        convert_split_bn(self.encoder_q, build.bn_splits)
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = MemoryQueue(cfg.queue_size, cfg.feat_dim)

    def build_head(self, in_dim: int) -> nn.Module:
        """The projector of pooled features; MoCo-v1 overrides it with a linear one."""
        return MLPHead(in_dim, self.cfg.hidden_dim, self.cfg.feat_dim)

    def views(self) -> Callable[[Any], list[Tensor]]:
        view = moco_v2_view(self.build_ctx.image_size)
        return MultiView([view, view])

    @staticmethod
    def project(encoder: nn.ModuleDict, feats: Tensor) -> Tensor:
        """L2-normalised projection of a globally pooled feature map, in float32."""
        return F.normalize(encoder["head"](feats.mean(dim=(2, 3))).float(), dim=1)

    @classmethod
    def embed(cls, encoder: nn.ModuleDict, images: Tensor) -> Tensor:
        """L2-normalised projection of globally pooled layer4 features, in float32."""
        return cls.project(encoder, encoder["backbone"](images))

    def encode(self, im_q: Tensor, im_k: Tensor, key_map: KeyMap = "none") -> MoCoEncoding:
        """MoCo's encode step: queries, momentum update, shuffle-BN keys, back in order.

        The query encoder embeds ``im_q`` (with gradient). Then, without gradient, the key
        encoder moves by EMA *before* it encodes this step's keys (as in MoCo), ``im_k`` is
        shuffled across the batch (``shuffle_bn``) for the key forward, and the keys are
        un-shuffled. ``key_map`` says whether the key layer4 map is returned too:
        ``"unshuffled"`` in batch order (what a per-image use of it needs), ``"shuffled"``
        in the order the key encoder saw it (ConCL's ``reproduce_shuffle_bug``), or
        ``"none"`` (not un-shuffled, which would cost a gather of the map under DDP).
        """
        if key_map not in KEY_MAPS:
            raise ValueError(f"key_map must be one of {', '.join(KEY_MAPS)}, got {key_map!r}")
        feat_q = self.encoder_q["backbone"](im_q)
        q = self.project(self.encoder_q, feat_q)
        with torch.no_grad():
            ema_update_(self.encoder_k, self.encoder_q, self.cfg.momentum)
            if self.cfg.shuffle_bn:
                im_k, idx_unshuffle = batch_shuffle(im_k)
            feat_k = self.encoder_k["backbone"](im_k)
            k = self.project(self.encoder_k, feat_k)
            if self.cfg.shuffle_bn:
                k = batch_unshuffle(k, idx_unshuffle)
                if key_map == "unshuffled":
                    feat_k = batch_unshuffle(feat_k, idx_unshuffle)
        return MoCoEncoding(q, k, feat_q, feat_k if key_map != "none" else None)

    def instance_loss(self, enc: MoCoEncoding) -> Tensor:
        """InfoNCE of the queries against their keys and the queue; then enqueue the keys."""
        loss = info_nce(enc.q, enc.k, self.queue.keys(), self.cfg.temperature)
        self.queue.enqueue(concat_all_gather(enc.k))
        return loss

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        im_q, im_k = views
        return {"loss": self.instance_loss(self.encode(im_q, im_k))}

    def backbone(self) -> nn.Module:
        return self.encoder_q["backbone"]
