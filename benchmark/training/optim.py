"""Optimizers of the pre-training stage: SGD (MoCo family) and LARS (SimCLR, BYOL).

Parameter groups come from the method (``Method.param_groups``; e.g.
``methods.param_groups.exclude_norm_and_bias``). A group may carry ``weight_decay``
(overriding the default) and ``lars_exclude=True``: such parameters get plain momentum SGD
with no layer-wise adaptation, as BN parameters and biases in OpenSelfSup's LARS configs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from benchmark.core.schema import OPTIMIZERS


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), OpenSelfSup's formulation.

    For every parameter ``w`` with gradient ``g`` in a group that is not ``lars_exclude``::

        local_lr = η · ‖w‖ / (‖g‖ + wd · ‖w‖)
        v ← m · v + local_lr · lr · (g + wd · w)
        w ← w − v

    Excluded parameters use ``local_lr = 1``. The norms stay on the device (no host sync).
    Where either norm is 0 the trust ratio is 1 (as in lightly's and torchlars' LARS): this
    avoids 0 · ∞ for a zero gradient without weight decay, and lets a zero-initialised
    layer move, where OpenSelfSup's formula would keep it at 0.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} eta={eta}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum, eta = group["weight_decay"], group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["lars_exclude"]:
                    local_lr: Tensor | float = 1.0
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = eta * w_norm / (g_norm + wd * w_norm)
                    usable = (w_norm > 0) & (g_norm > 0)
                    local_lr = torch.where(usable, trust, torch.ones_like(trust))
                update = grad.add(p, alpha=wd).mul_(local_lr).mul_(group["lr"])
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(update)
                    update = state["momentum_buffer"]
                p.sub_(update)
        return loss


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``sgd`` or ``lars``) over the method's parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=trust_coefficient
        )
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
