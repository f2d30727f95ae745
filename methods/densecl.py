"""DenseCL (Wang et al. 2021) as configured in ConCL's NCT pre-training.

TencentAILabHealthcare/ConCL ``configs/NCT_pretraining/densecl/r18_bs256_ep200.py``:
MoCo-v2 plus a dense branch: a 1×1-conv projector on the layer4 grid, each query cell's
positive is the key cell whose *backbone* feature is most similar (arg-max), and the
negatives are a second queue of average-pooled dense key projections. The loss is
``(1 − λ)·global + λ·dense`` with λ = 0.5, τ = 0.2 for both terms, queues of 16384. The
engine supplies SGD (lr 0.03, momentum 0.9, wd 1e-4) and the per-epoch cosine schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.core.contracts import BuildContext, StepContext
from benchmark.core.registry import register_method
from methods.distributed import concat_all_gather
from methods.heads import DenseHead
from methods.losses import info_nce
from methods.mocov2 import MoCoV2, MoCoV2Config
from methods.momentum import momentum_copy
from methods.queue import MemoryQueue


@dataclass
class DenseCLConfig(MoCoV2Config):
    name: str = "densecl"
    #: Weight λ of the dense loss; the global loss gets 1 − λ.
    loss_lambda: float = 0.5

    def problems(self) -> list[str]:
        if not 0.0 <= self.loss_lambda <= 1.0:
            return [f"loss_lambda must be in [0, 1], got {self.loss_lambda}"]
        return []


@torch.no_grad()
def match_cells(q_cells: Tensor, k_cells: Tensor) -> Tensor:
    """For each query cell, the key cell of the same image with the most similar feature.

    ``q_cells``, ``k_cells``: (B, C, S²) backbone features, L2-normalised over C. Returns
    (B, S²) key-cell indices. The similarities are computed in float32 with autocast off:
    in bf16, near-equal cells would tie and the arg-max would drift from the original's.
    """
    with torch.autocast(device_type=q_cells.device.type, enabled=False):
        sim = torch.bmm(q_cells.float().transpose(1, 2), k_cells.float())  # (B, S², S²)
    return sim.argmax(dim=2)


def dense_info_nce(
    q_grid: Tensor, k_grid: Tensor, match: Tensor, negatives: Tensor, temperature: float
) -> Tensor:
    """DenseCL's dense loss: InfoNCE per query cell, averaged over all B·S² cells.

    ``q_grid``, ``k_grid``: (B, D, S²) L2-normalised dense projections; ``match``: (B, S²)
    index of each query cell's positive key cell (``match_cells``); ``negatives``: (K, D).
    """
    d = q_grid.shape[1]
    positives = torch.gather(k_grid, 2, match.unsqueeze(1).expand(-1, d, -1))
    queries = q_grid.transpose(1, 2).reshape(-1, d)
    return info_nce(queries, positives.transpose(1, 2).reshape(-1, d), negatives, temperature)


@register_method("densecl")
class DenseCL(MoCoV2):
    """MoCo-v2 plus InfoNCE between arg-max matched cells of the layer4 grid.

    Encoders are ``ModuleDict(backbone, head=MLPHead, dense_head=DenseHead)``: MoCo-v2's,
    plus the dense head; the key encoder's is a momentum copy like the rest.
    """

    config_class = DenseCLConfig
    cfg: DenseCLConfig

    def __init__(self, cfg: DenseCLConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        in_dim = self.encoder_q["backbone"].out_channels
        dense_head = DenseHead(in_dim, cfg.hidden_dim, cfg.feat_dim)
        self.encoder_q["dense_head"] = dense_head
        self.encoder_k["dense_head"] = momentum_copy(dense_head)
        self.queue_dense = MemoryQueue(cfg.queue_size, cfg.feat_dim)

    @staticmethod
    def dense(encoder: nn.ModuleDict, feats: Tensor) -> tuple[Tensor, Tensor]:
        """The dense branch of one encoder's layer4 map ``feats`` (B, C, S×S), in float32.

        Returns the backbone cells (B, C, S²), L2-normalised over C and detached (they only
        serve the arg-max match, which has no gradient), and the raw dense projection
        (B, D, S²), normalised by the caller because the key side also average-pools it.
        """
        dense = encoder["dense_head"](feats).float().flatten(2)
        cells = F.normalize(feats.detach().float().flatten(2), dim=1)
        return cells, dense

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        im_q, im_k = views
        # MoCo-v2's step; the key map comes back un-shuffled, so the dense key branch below
        # runs on it in batch order (per-image operations: the same values as un-shuffling
        # its outputs, as the original does).
        enc = self.encode(im_q, im_k, key_map="unshuffled")
        q_cells, q_dense = self.dense(self.encoder_q, enc.feat_q)
        q_grid = F.normalize(q_dense, dim=1)
        with torch.no_grad():
            k_cells, k_dense = self.dense(self.encoder_k, enc.feat_k)
            k_grid = F.normalize(k_dense, dim=1)
            k_pooled = F.normalize(k_dense.mean(dim=2), dim=1)  # the dense queue's keys
            match = match_cells(q_cells, k_cells)
        global_loss = self.instance_loss(enc)
        dense_loss = dense_info_nce(
            q_grid, k_grid, match, self.queue_dense.keys(), self.cfg.temperature
        )
        lam = self.cfg.loss_lambda
        loss = (1.0 - lam) * global_loss + lam * dense_loss
        self.queue_dense.enqueue(concat_all_gather(k_pooled))
        return {
            "loss": loss,
            "global_loss": global_loss.detach(),
            "dense_loss": dense_loss.detach(),
        }
