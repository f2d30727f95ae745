"""Weighted k-NN on frozen features, the protocol of DINO (``eval_knn.py``) and eva.

Features are L2-normalised; each test sample takes the ``k`` training samples of highest
cosine similarity, and each of them votes for its class with weight ``exp(sim / T)``. The
class with the largest vote wins (ties: the lower class index, as ``argmax`` breaks them).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


@torch.inference_mode()
def knn_predict(
    train: Tensor,
    train_labels: Tensor,
    test: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class of each row of ``test`` (N_test,), from ``train`` (N_train, D) with
    integer ``train_labels``. ``k`` is capped at the training set size."""
    k = min(k, len(train))
    train = F.normalize(train.float(), dim=1)
    labels = train_labels.long().to(train.device)
    out = []
    for start in range(0, len(test), chunk):
        query = F.normalize(test[start : start + chunk].float().to(train.device), dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=train.device, dtype=sim.dtype)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out).cpu()
