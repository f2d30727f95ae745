"""Momentum (EMA) encoders of MoCo-style methods."""

from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy: the momentum encoder starts equal to the online one.

    Its parameters never get gradients; they only follow ``ema_update_``.
    """
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = m * target + (1 - m) * online`` over parameters only.

    Buffers (BatchNorm running statistics) are left alone, as in MoCo: the momentum
    encoder's running stats come from its own forward passes.
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(
            f"target has {len(target_params)} parameters, online has {len(online_params)}"
        )
    if not target_params:
        return
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, [p.detach() for p in online_params], alpha=1.0 - momentum)
