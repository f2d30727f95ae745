"""Contrastive losses shared by the MoCo family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(
    q: Tensor, k: Tensor, negatives: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """InfoNCE with one positive per query and a shared bank of negatives.

    ``q``, ``k``: (N, D) L2-normalised queries and their positive keys; ``negatives``: (K, D).
    Logits ``[q·k, q·negatives] / τ`` and cross-entropy with target 0, averaged over N
    (OpenSelfSup ``ContrastiveHead``). Computed in float32 with autocast off: with τ = 0.2
    and 16k negatives, bf16 logits would lose the small similarity differences that carry
    the signal. With a boolean ``mask`` (N,) the mean runs over the rows where it is True
    only (0 when there are none), so a fixed-size batch can carry absent rows.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, negatives = q.float(), k.float(), negatives.float()
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ negatives.T
        logits = torch.cat([pos, neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        if mask is None:
            return F.cross_entropy(logits, labels)
        per_row = F.cross_entropy(logits, labels, reduction="none")
        weight = mask.to(per_row.dtype)
        return (per_row * weight).sum() / weight.sum().clamp(min=1)
