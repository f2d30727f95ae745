"""BYOL (Grill et al. 2020) as configured in ConCL's NCT pre-training.

TencentAILabHealthcare/ConCL ``configs/NCT_pretraining/byol/r18_bs1024_ep200.py``: ResNet-18
trunk with SyncBN over the global batch of 1024, projector and predictor ``NonLinearNeckV2``
(Linear-BN-ReLU-Linear, 512→512→256 and 256→512→256), target network = EMA of trunk +
projector with momentum 0.996 → 1 on a per-iteration cosine (``BYOLHook``), symmetric loss.
The engine supplies LARS (lr 0.2 at 1024, η 0.001, wd 1.5e-6, norms and biases excluded) and
the 2-epoch warm-up then per-epoch cosine.

The loss is BYOL's ``2 − 2cos`` averaged over the batch and summed over both view orders,
in [0, 8]. The original logs ``−2·Σcos/N`` per direction (OpenSelfSup's
``LatentPredictHead``), summed over the two orders (``BYOL.forward_train``), in [−4, 4]:
this value less 4 (2 per direction); the gradients are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from benchmark.core.contracts import BuildContext, StepContext
from benchmark.core.registry import register_method
from methods.augment import MultiView, byol_views
from methods.backbones import build_trunk
from methods.base import Method, MethodConfig
from methods.momentum import ema_update_, momentum_copy
from methods.param_groups import exclude_norm_and_bias
from methods.shuffle_bn import convert_split_bn


@dataclass
class BYOLConfig(MethodConfig):
    """Model part of ConCL's ``configs/NCT_pretraining/byol/r18_bs1024_ep200.py``."""

    name: str = "byol"
    depth: int = 18
    projector_hidden_dim: int = 512
    #: Output width of projector and predictor (``out_channels=256``).
    feat_dim: int = 256
    predictor_hidden_dim: int = 512
    #: Target momentum at step 0 (``base_momentum``) and at the last step (``BYOLHook``).
    base_momentum: float = 0.996
    end_momentum: float = 1.0
    #: Images per BatchNorm group in projector and predictor: plain BN1d over each GPU's
    #: 128 images in the original, while the trunk's SyncBN spans the whole batch.
    head_bn_batch_size: int = 128

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.base_momentum <= self.end_momentum <= 1.0:
            problems.append(
                "base_momentum and end_momentum must satisfy 0 <= base <= end <= 1, got "
                f"{self.base_momentum} and {self.end_momentum}"
            )
        if min(self.projector_hidden_dim, self.feat_dim, self.predictor_hidden_dim) < 1:
            problems.append("projector_hidden_dim, feat_dim and predictor_hidden_dim must be >= 1")
        if self.head_bn_batch_size < 2:
            problems.append(f"head_bn_batch_size must be >= 2, got {self.head_bn_batch_size}")
        return problems


def target_momentum(step: int, total_steps: int, base: float, end: float = 1.0) -> float:
    """``BYOLHook``: ``end − (end − base)·(cos(π·step/total) + 1)/2`` at global ``step``.

    Set before each iteration in the original, so step 0 uses ``base`` and the schedule
    reaches ``end`` only at ``step == total_steps`` (one past the last step).
    """
    return end - (end - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's ``2 − 2·cos(pᵢ, zᵢ)`` averaged over the batch (one direction).

    OpenSelfSup's ``LatentPredictHead`` returns ``−2·Σᵢ cos / N``, the same less the
    constant 2: the gradients are identical, and the logged value stays in [0, 4] per
    direction as in the BYOL paper (add −2 per direction to compare with OpenSelfSup logs).
    Computed in float32 with autocast off, so bf16 projections do not round the cosines.
    """
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        p = F.normalize(prediction.float(), dim=1)
        z = F.normalize(target.float(), dim=1)
        return 2.0 - 2.0 * (p * z).sum() / p.shape[0]


class LocalBatchNorm1d(_NormBase):
    """BatchNorm1d over groups of ``group_size`` rows that is never synchronised.

    OpenSelfSup's ``NonLinearNeckV2`` holds a plain ``nn.BatchNorm1d``, so in the original
    the heads normalise over each GPU's 128 images while the trunk's SyncBN spans all 1024.
    Deriving from ``_NormBase`` and not ``_BatchNorm`` keeps the engine's SyncBN conversion
    away from this layer (the LARS exclusion of norm layers still applies), and the groups
    give per-GPU statistics when one process holds several GPUs' share. As in
    ``SplitBatchNorm2d``, row i falls in group i % S and the running statistics are the
    groups' mean; eval mode is plain BatchNorm1d. ``state_dict`` keys are BatchNorm1d's.
    """

    def __init__(
        self, num_features: int, group_size: int, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True)
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size = group_size

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"LocalBatchNorm1d expects (N, C) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        n, c = x.shape
        size = min(self.group_size, n)
        if n % size:
            raise ValueError(
                f"LocalBatchNorm1d: batch of {n} is not a multiple of its groups of {size}; "
                "the per-process batch must be a multiple of method.head_bn_batch_size"
            )
        s = n // size
        self.num_batches_tracked.add_(1)
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(size, s * c),
            mean,
            var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        ).reshape(n, c)
        self.running_mean.copy_(mean.view(s, c).mean(dim=0))
        self.running_var.copy_(var.view(s, c).mean(dim=0))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class BatchNormMLP(nn.Sequential):
    """OpenSelfSup's ``NonLinearNeckV2`` without its avg-pool: Linear → BN1d → ReLU → Linear.

    ``init`` follows the original: ``kaiming`` (fan-in, ReLU gain) for the projector,
    ``normal`` (std 0.01) for the predictor; biases 0, BN weight 1 and bias 0.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, bn_group_size: int, init: str
    ) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            LocalBatchNorm1d(hidden_dim, bn_group_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        for m in self:
            if isinstance(m, nn.Linear):
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                elif init == "normal":
                    nn.init.normal_(m.weight, std=0.01)
                else:
                    raise ValueError(f"unknown init {init!r}; use kaiming or normal")
                nn.init.zeros_(m.bias)


@register_method("byol")
class BYOL(Method):
    """Online network + predictor regress the target network's projection of the other view.

    ``online`` and ``target`` are ``ModuleDict(backbone=trunk, projector=...)``; the target
    is a frozen copy that only follows ``ema_update_`` after each optimizer step, with the
    momentum of that step's ``target_momentum``.
    """

    config_class = BYOLConfig
    cfg: BYOLConfig
    sync_bn = True

    def __init__(self, cfg: BYOLConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        batch = build.local_batch_size
        head_group = min(cfg.head_bn_batch_size, batch)
        if batch % head_group:
            raise ValueError(
                f"per-process batch {batch} is not a multiple of method.head_bn_batch_size="
                f"{cfg.head_bn_batch_size}: change pretrain.batch_size, the number of GPUs or "
                "method.head_bn_batch_size"
            )
        trunk = build_trunk(cfg.depth)
        convert_split_bn(trunk, build.bn_splits)
        projector = BatchNormMLP(
            trunk.out_channels, cfg.projector_hidden_dim, cfg.feat_dim, head_group, "kaiming"
        )
        self.online = nn.ModuleDict({"backbone": trunk, "projector": projector})
        self.predictor = BatchNormMLP(
            cfg.feat_dim, cfg.predictor_hidden_dim, cfg.feat_dim, head_group, "normal"
        )
        self.target = momentum_copy(self.online)

    def views(self) -> Callable[[Any], list[Tensor]]:
        return MultiView(byol_views(self.build_ctx.image_size))

    @staticmethod
    def project(network: nn.ModuleDict, images: Tensor) -> Tensor:
        """Projection of globally pooled layer4 features."""
        return network["projector"](network["backbone"](images).mean(dim=(2, 3)))

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        # Each view is its own BN batch, as in the original's separate forward passes.
        im_1, im_2 = views
        p_1 = self.predictor(self.project(self.online, im_1))
        p_2 = self.predictor(self.project(self.online, im_2))
        with torch.no_grad():
            z_1 = self.project(self.target, im_1)
            z_2 = self.project(self.target, im_2)
        return {"loss": byol_loss(p_1, z_2) + byol_loss(p_2, z_1)}

    def on_step_end(self, ctx: StepContext) -> None:
        """The target follows the just-updated online network (``BYOLHook``)."""
        m = target_momentum(
            ctx.step, ctx.total_steps, self.cfg.base_momentum, self.cfg.end_momentum
        )
        ema_update_(self.target, self.online, m)

    def param_groups(self) -> list[dict[str, Any]]:
        """LARS groups over what the loss trains: online network and predictor."""
        return exclude_norm_and_bias(nn.ModuleList([self.online, self.predictor]))

    def backbone(self) -> nn.Module:
        return self.online["backbone"]
