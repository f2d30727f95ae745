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
