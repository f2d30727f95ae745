"""ConCL (Yang et al., ECCV 2022): contrastive learning of per-image concepts.

The released model is TencentAILabHealthcare/ConCL ``openselfsup/models/concl.py``.

MoCo-v2 for ``warmup_epochs``; then, every step, the momentum encoder's ``cluster_layer``
map of a clean reference view (the union of the two crops) is clustered per image into K
concepts, the clustering is cut into each view's feature grid, and the layer4 features of
every concept present in both views are masked-average pooled into a query and a key
prototype. These go through the shared MLP head and an InfoNCE against a separate concept
queue. Loss ``w · concept + (1 − w) · instance`` (w = 1 in the paper).

Deviation, on purpose: the released code pools key prototypes from the *shuffled* key
feature map (``pre_gap_k`` is computed on the shuffled key batch and handed to
``get_paired_prototypes`` as is; only the pooled key ``k`` is un-shuffled), so prototype b
pairs with a random other image, even on one GPU. Here the map is un-shuffled first;
``reproduce_shuffle_bug=true`` restores the released behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.core.contracts import BuildContext, StepContext
from benchmark.core.registry import register_method
from methods.backbones import STAGES
from methods.concepts import cosine_kmeans, match_concepts, paired_prototypes, sample_or_pad
from methods.distributed import concat_all_gather
from methods.losses import info_nce
from methods.mocov2 import MoCoV2, MoCoV2Config
from methods.queue import MemoryQueue
from methods.reference_view import ConceptViews


@dataclass
class ConCLConfig(MoCoV2Config):
    """ConCL's ``configs/NCT_pretraining/concl/r18_bs256_ep200.py``; τ applies to the
    instance loss, ``concept_temperature`` to the concept loss (both 0.2 in the paper)."""

    name: str = "concl"
    num_concepts: int = 8
    kmeans_iterations: int = 10
    #: Stage of the momentum encoder that is clustered (``cluster_indice=3`` → layer3).
    cluster_layer: str = "layer3"
    concept_weight: float = 1.0
    concept_temperature: float = 0.2
    concept_queue_size: int = 16384
    #: Epochs of instance-only training before the concept loss starts (``ConCLHook``).
    warmup_epochs: int = 20
    #: Pool key prototypes from the shuffled key map, as the released code (module docstring).
    reproduce_shuffle_bug: bool = False

    def revision(self) -> int:
        # 1: 'stem' is the map before the max-pool (f1 of the original), not after it.
        return 1 if self.cluster_layer == "stem" else 0

    def problems(self) -> list[str]:
        problems = []
        if self.num_concepts < 2:
            problems.append(f"num_concepts must be >= 2, got {self.num_concepts}")
        if self.kmeans_iterations < 1:
            problems.append(f"kmeans_iterations must be >= 1, got {self.kmeans_iterations}")
        if self.cluster_layer not in STAGES:
            problems.append(
                f"cluster_layer must be one of {', '.join(STAGES)}, got {self.cluster_layer!r}"
            )
        if not 0.0 <= self.concept_weight <= 1.0:
            problems.append(f"concept_weight must be in [0, 1], got {self.concept_weight}")
        if self.temperature <= 0 or self.concept_temperature <= 0:
            problems.append("temperature and concept_temperature must be > 0")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        return problems


@register_method("concl")
class ConCL(MoCoV2):
    """Contrasts per-image k-means concepts matched across two views, after MoCo-v2 warm-up.

    Encoders, instance queue and the head shared by both losses are MoCo-v2's.
    """

    config_class = ConCLConfig
    cfg: ConCLConfig

    def __init__(self, cfg: ConCLConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        self.concept_queue = MemoryQueue(cfg.concept_queue_size, cfg.feat_dim)
        batch = build.local_batch_size
        # Key prototypes enqueued per process and step: K·B, or 4·B when K > 8
        # (``num_sampled_protos`` in the released ``forward_train``).
        self.prototypes_per_step = min(
            cfg.num_concepts * batch if cfg.num_concepts <= 8 else 4 * batch,
            cfg.concept_queue_size,
        )

    def views(self) -> Callable[[Any], list[Tensor]]:
        return ConceptViews(self.build_ctx.image_size)

    def concepts_on(self, ctx: StepContext) -> bool:
        return ctx.epoch >= self.cfg.warmup_epochs

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        im_q, im_k, im_ref, boxes = views
        cfg = self.cfg
        concepts = self.concepts_on(ctx)
        if not concepts:  # the warm-up: exactly MoCo-v2's step
            instance = self.instance_loss(self.encode(im_q, im_k))
            zero = instance.new_zeros(())
            return {
                "loss": instance,
                "instance_loss": instance.detach(),
                "concept_loss": zero,
                "concept_pairs": zero,
            }

        # The key map feeds the key prototypes; with reproduce_shuffle_bug it stays in the
        # shuffled order the key encoder saw, as in the released code.
        key_map = "shuffled" if cfg.reproduce_shuffle_bug else "unshuffled"
        enc = self.encode(im_q, im_k, key_map=key_map)
        with torch.no_grad():  # the reference view goes through the key encoder unshuffled
            reference = self.encoder_k["backbone"].forward_stages(im_ref, (cfg.cluster_layer,))
        instance = self.instance_loss(enc)
        concept, pairs = self.concept_loss(
            enc.feat_q, enc.feat_k, reference[cfg.cluster_layer], boxes
        )
        loss = cfg.concept_weight * concept + (1.0 - cfg.concept_weight) * instance
        return {
            "loss": loss,
            "instance_loss": instance.detach(),
            "concept_loss": concept.detach(),
            "concept_pairs": pairs,
        }

    def concept_loss(
        self, feat_q: Tensor, feat_k: Tensor, reference: Tensor, boxes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """InfoNCE of paired concept prototypes; also the mean number of pairs per image."""
        cfg, num = self.cfg, self.cfg.num_concepts
        batch = feat_q.shape[0]
        with torch.no_grad():
            ref_h, ref_w = reference.shape[-2:]
            labels = cosine_kmeans(reference.flatten(2).transpose(1, 2), num, cfg.kmeans_iterations)
            labels = labels.view(batch, ref_h, ref_w)
            grid = (feat_q.shape[-2], feat_q.shape[-1])
            map_q = match_concepts(labels, boxes[:, 0], num, grid)
            map_k = match_concepts(labels, boxes[:, 1], num, grid)
        proto_q, proto_k, valid = paired_prototypes(feat_q, feat_k.detach(), map_q, map_k, num)
        z_q = F.normalize(self.encoder_q["head"](proto_q.flatten(0, 1)).float(), dim=1)
        valid = valid.flatten()
        with torch.no_grad():
            z_k = F.normalize(self.encoder_k["head"](proto_k.flatten(0, 1)).float(), dim=1)
        loss = info_nce(z_q, z_k, self.concept_queue.keys(), cfg.concept_temperature, valid)
        with torch.no_grad():
            index, keep = sample_or_pad(valid, self.prototypes_per_step)
            self.concept_queue.enqueue(concat_all_gather(z_k[index]), concat_all_gather(keep))
        return loss, valid.sum().float() / batch

    def extra_repr(self) -> str:
        return f"concepts={self.cfg.num_concepts}, cluster_layer={self.cfg.cluster_layer}"
