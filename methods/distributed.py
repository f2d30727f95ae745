"""Collectives that degrade to the identity in one process, so methods have one code path."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, without gradient.

    All ranks must pass the same shape. In one process ``t`` itself is returned.
    """
    if not is_distributed():
        return t
    t = t.contiguous()
    out = t.new_empty((world_size() * t.shape[0], *t.shape[1:]))
    # ``all_gather_single`` is the newer name (torch >= 2.14) of ``all_gather_into_tensor``.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward sums every rank's gradient and keeps this rank's rows.

    Each rank's loss uses all gathered rows, so the gradient of rank r's rows is spread over
    every rank's graph. Summing them (all-reduce) gives rank r the gradient of the sum of
    the per-rank losses with respect to its own rows; DDP's averaging then yields the
    gradient of their mean. (OpenSelfSup's ``GatherLayer`` keeps only the local slice, which
    is right only when every rank computes the whole loss, and then DDP's averaging divides
    the gradient by the world size.)
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Tensor) -> Tensor:  # type: ignore[override]
        t = t.contiguous()
        out = t.new_empty((world_size() * t.shape[0], *t.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()].contiguous()


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order, differentiable.

    For losses over the global batch (SimCLR's NT-Xent): gradients reach this rank's ``t``
    from every rank's loss. All ranks must pass the same shape. In one process ``t`` itself
    is returned.
    """
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)
