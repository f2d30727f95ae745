"""SimCLR (Chen et al. 2020) as configured in ConCL's NCT pre-training.

TencentAILabHealthcare/ConCL ``configs/NCT_pretraining/simclr/r18_bs1024_ep200.py``:
ResNet-18, projector 512→512 (no bias)-BN-ReLU-512→128 (no bias)-BN, NT-Xent with τ 0.1
over the 2N views of the global batch, BatchNorm over the whole batch (SyncBN). The engine
supplies LARS (lr 0.6 at batch 1024, momentum 0.9, η 0.001, wd 1e-6; BN parameters and
biases without weight decay or adaptation), the 10-epoch per-iteration warm-up and the
per-epoch cosine schedule.

Deviation, on purpose: in the original every rank computes the loss of all 2N rows and its
``GatherLayer`` passes back only the local slice of that rank's gradient, so after DDP
averages over the 8 GPUs the gradient is the full-batch gradient divided by 8 (LARS hides
most of that for adapted weights, not for the BN parameters and biases it excludes). Here
each rank computes the loss of its own rows against all gathered columns and the gather's
backward sums the gradients of all ranks, so DDP's average is the full-batch gradient on
any number of processes.
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
from methods.augment import MultiView, simclr_view
from methods.backbones import build_trunk
from methods.base import Method, MethodConfig
from methods.distributed import all_gather_with_grad, rank
from methods.param_groups import exclude_norm_and_bias


@dataclass
class SimCLRConfig(MethodConfig):
    """``configs/NCT_pretraining/simclr/r18_bs1024_ep200.py`` of TencentAILabHealthcare/ConCL."""

    name: str = "simclr"
    depth: int = 18
    hidden_dim: int = 512
    feat_dim: int = 128
    temperature: float = 0.1

    def problems(self) -> list[str]:
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.hidden_dim < 1 or self.feat_dim < 1:
            problems.append("hidden_dim and feat_dim must be >= 1")
        return problems


class SimCLRProjector(nn.Sequential):
    """OpenSelfSup's ``NonLinearNeckSimCLR`` (two layers) without its avg-pool.

    Linear (no bias) → BN → ReLU → Linear (no bias) → BN. The last BN keeps its bias, as in
    OpenSelfSup (PyTorch's BN cannot have a weight without a bias; the official SimCLR has
    none there). Linears are kaiming(fan_in, relu) initialised, as ``init_linear='kaiming'``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """NT-Xent of this rank's rows against the 2N rows gathered from every rank.

    ``z``: (2n, D) L2-normalised embeddings of this rank's n images, first views then
    second views, so row i's positive is row (i + n) mod 2n. Each row is contrasted with
    its positive and the 2N − 2 other rows of the global batch (itself excluded), and the
    cross-entropy is averaged over the local rows; with equal shares per rank the mean of
    the per-rank losses is the full-batch loss. Float32 with autocast off, as ``info_nce``.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        rows = z.shape[0]
        if rows % 2:
            raise ValueError(f"nt_xent needs two views per image, got {rows} rows")
        z_all = all_gather_with_grad(z)
        local = torch.arange(rows, device=z.device)
        own_cols = rank() * rows + local
        logits = (z @ z_all.T) / temperature
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[local, own_cols] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = rank() * rows + (local + rows // 2) % rows
        return F.cross_entropy(logits, positives)


@register_method("simclr")
class SimCLR(Method):
    """NT-Xent between two views of each image, every other view of the global batch negative.

    One encoder, ``ModuleDict(backbone=trunk, head=SimCLRProjector)``. Both views go through
    the network as one batch of 2n images, as the original's reshaped
    input: BatchNorm statistics cover both views of the whole per-process batch, and the
    engine turns them into SyncBN under DDP on CUDA (global 2N, as the original's SyncBN).
    ``pretrain.bn_batch_size`` is therefore not used; with several CPU (gloo) processes BN
    stays per process.
    """

    config_class = SimCLRConfig
    cfg: SimCLRConfig
    sync_bn = True

    def __init__(self, cfg: SimCLRConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        trunk = build_trunk(cfg.depth)
        self.encoder = nn.ModuleDict(
            {
                "backbone": trunk,
                "head": SimCLRProjector(trunk.out_channels, cfg.hidden_dim, cfg.feat_dim),
            }
        )

    def views(self) -> Callable[[Any], list[Tensor]]:
        view = simclr_view(self.build_ctx.image_size)
        return MultiView([view, view])

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised projection of globally pooled layer4 features, in float32."""
        pooled = self.encoder["backbone"](images).mean(dim=(2, 3))
        return F.normalize(self.encoder["head"](pooled).float(), dim=1)

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        view1, view2 = views
        z = self.embed(torch.cat([view1, view2]))
        return {"loss": nt_xent(z, self.cfg.temperature)}

    def backbone(self) -> nn.Module:
        return self.encoder["backbone"]

    def param_groups(self) -> list[dict[str, Any]]:
        """BN parameters and biases: no weight decay and no LARS adaptation (the
        ``paramwise_options`` of ConCL's NCT SimCLR config)."""
        return exclude_norm_and_bias(self)
