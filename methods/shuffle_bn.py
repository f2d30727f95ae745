"""Shuffle-BN: keep BatchNorm from leaking which key belongs to which query.

With per-GPU BatchNorm, a query and its positive key normalised with statistics of the
same images give the network a shortcut (MoCo §3.3). MoCo breaks it by shuffling the key
batch across GPUs before the key encoder and un-shuffling after. ``SplitBatchNorm2d``
reproduces per-GPU statistics inside one process (e.g. batch 256 as 8 groups of 32), so the
same recipe works on any number of GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from methods.distributed import concat_all_gather, is_distributed, rank, world_size


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """Randomly redistribute the global batch over ranks (MoCo ``_batch_shuffle_ddp``).

    Returns this rank's share of the shuffled global batch and the index that undoes the
    shuffle (pass it to ``batch_unshuffle``). The permutation is drawn on rank 0 and
    broadcast. In one process it is a random permutation of the batch; together with
    ``SplitBatchNorm2d`` that makes the BN groups random, as across GPUs.
    """
    x_all = concat_all_gather(x)
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    if is_distributed():
        dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(world_size(), -1)[rank()]
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Bring this rank's original rows back, in order (MoCo ``_batch_unshuffle_ddp``)."""
    x_all = concat_all_gather(x)
    idx_this = idx_unshuffle.view(world_size(), -1)[rank()]
    return x_all[idx_this]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over ``num_splits`` groups.

    Emulates ``num_splits`` GPUs with plain (unsynchronised) BN in one process, the trick of
    MoCo's CIFAR demo: (N, C, H, W) is viewed as (N/S, S·C, H, W) and normalised with the
    running stats repeated S times; the S updated running stats are then averaged back.
    With this view, **sample i falls in group i % S**. The key batch is shuffled first
    (``batch_shuffle``), so its groups are random, like the per-GPU shards of shuffle-BN.
    Averaging the running stats of the groups stands in for one GPU's own stats (OpenSelfSup
    saves rank 0's). Eval mode is plain BatchNorm2d. Parameter and buffer names are
    BatchNorm2d's, so ``state_dict`` keys match torchvision.
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        uses_batch_stats = self.training or self.running_mean is None
        if self.num_splits == 1 or not uses_batch_stats:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(
                f"SplitBatchNorm2d: batch of {n} is not divisible by num_splits={s}; "
                "the per-process batch must be a multiple of pretrain.bn_batch_size"
            )
        # Same momentum bookkeeping as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        mean_split = self.running_mean.repeat(s) if update else None
        var_split = self.running_var.repeat(s) if update else None
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        grouped = x.reshape(n // s, s * c, h, w)
        out = F.batch_norm(
            grouped,
            mean_split,
            var_split,
            weight,
            bias,
            training=True,
            momentum=factor,
            eps=self.eps,
        ).reshape(n, c, h, w)
        if update:
            self.running_mean.copy_(mean_split.view(s, c).mean(dim=0))
            self.running_var.copy_(var_split.view(s, c).mean(dim=0))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # The grouping view needs NCHW; hand channels_last back to the next conv.
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` (exact type) by a ``SplitBatchNorm2d``.

    The new layers share the old parameter and buffer objects, so state and any optimizer
    already holding the parameters stay valid. Returns ``module`` (or the replacement if
    ``module`` itself is a BatchNorm2d); a no-op when ``num_splits == 1``.
    """
    if num_splits == 1:
        return module
    if type(module) is nn.BatchNorm2d:
        split = SplitBatchNorm2d(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        if module.affine:
            split.weight = module.weight
            split.bias = module.bias
        split.running_mean = module.running_mean
        split.running_var = module.running_var
        split.num_batches_tracked = module.num_batches_tracked
        split.train(module.training)
        return split
    for name, child in module.named_children():
        new = convert_split_bn(child, num_splits)
        if new is not child:
            setattr(module, name, new)
    return module
