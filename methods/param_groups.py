"""Optimizer parameter groups that methods hand the engine (``Method.param_groups``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def exclude_norm_and_bias(module: nn.Module) -> list[dict[str, Any]]:
    """Two groups: weights that decay and adapt, and norm parameters and biases that don't.

    The second group carries ``weight_decay=0`` and ``lars_exclude=True`` (plain momentum
    SGD in the engine's LARS), as BN parameters and biases in OpenSelfSup's LARS configs
    (SimCLR and BYOL in ConCL's ``configs/NCT_pretraining/``). OpenSelfSup picks that group
    by name (``(bn|gn)(\\d+)?.(weight|bias)`` and ``bias``), which misses the downsample
    BN's weight (named ``downsample.1``); here it is chosen by module type, so every
    normalisation layer's parameters are excluded.
    """
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in module.modules():
        is_norm = isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for name, p in m.named_parameters(recurse=False):
            if p.requires_grad and (is_norm or name == "bias") and id(p) not in seen:
                excluded.append(p)
                seen.add(id(p))
    decayed = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
    return [
        {"params": decayed},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]
