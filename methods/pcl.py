"""PCL-v2 (Li et al., ICLR 2021): MoCo-v2 plus ProtoNCE against dataset-wide k-means prototypes.

The original benchmark trained PCL-v2 with the official code (salesforce/PCL
``main_pcl.py``, ``pcl/builder.py``) and left no config: TencentAILabHealthcare/ConCL has no
PCL model or config, only ``benchmarks/detection/convert-pretrain-to-detectron2_pcl.py``,
which reads PCL's ``module.encoder_q.*`` keys. This plugin follows that code. MoCo-v2
(τ 0.2, momentum 0.999, queue 16384, MLP head, shuffle-BN, MoCo-v2 views) trains alone for
``warmup_epochs``. From then on every epoch starts with a pass over the training set
(``on_dataset_pass``): the momentum encoder, in eval mode, embeds every center-cropped
image; the features are k-means clustered M times (M cluster counts) and each cluster gets a
concentration φ. The loss adds ProtoNCE, averaged over the M clusterings, to InfoNCE: each
query's positive is its image's prototype, the negatives ``r`` prototypes no query of the
batch is assigned to, and every logit is divided by its prototype's φ.

The clustering lives on the module as plain tensors, not in the checkpoint: a resumed run
re-clusters at the start of its next epoch, as every epoch after the warm-up does anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms

from benchmark.core.contracts import BuildContext, StepContext
from benchmark.core.registry import register_method
from methods.augment import normalize
from methods.clustering import concentration, kmeans
from methods.distributed import is_distributed, rank
from methods.mocov2 import MoCoV2, MoCoV2Config


@dataclass
class PCLConfig(MoCoV2Config):
    """``main_pcl.py`` defaults for PCL-v2 (``--mlp --aug-plus --cos``), scaled to R18/NCT."""

    name: str = "pcl"
    #: Cluster counts as fractions of the training set: PCL's 25k/50k/100k for ImageNet's
    #: 1.28M images. Each count is ``round(f · N)`` at the pass.
    cluster_fractions: list[float] = field(
        default_factory=lambda: [0.01953125, 0.0390625, 0.078125]
    )
    #: Explicit cluster counts; when non-empty they replace ``cluster_fractions``.
    num_clusters: list[int] = field(default_factory=list)
    #: Negative prototypes per clustering and step (``pcl_r``, also PCL's queue size); with
    #: fewer other clusters than this, all of them are negatives.
    num_negative_prototypes: int = 16384
    #: Epochs of InfoNCE only before the first clustering (``--warmup-epoch``).
    warmup_epochs: int = 20
    #: faiss ``Clustering`` settings of ``run_kmeans``: niter, nredo, max points per centroid.
    kmeans_iterations: int = 20
    kmeans_restarts: int = 5
    kmeans_max_points_per_centroid: int = 1000
    #: Clustering m is seeded with ``kmeans_seed + m`` every epoch (PCL: ``clus.seed = m``).
    kmeans_seed: int = 0
    #: α of φ = mean distance / log(count + α).
    concentration_alpha: float = 10.0

    def problems(self) -> list[str]:
        problems = []
        if not self.num_clusters and not self.cluster_fractions:
            problems.append("cluster_fractions must not be empty (or set num_clusters)")
        if any(not 0.0 < f <= 1.0 for f in self.cluster_fractions):
            problems.append(f"cluster_fractions must be in (0, 1], got {self.cluster_fractions}")
        if any(k < 2 for k in self.num_clusters):
            problems.append(f"num_clusters must be >= 2 each, got {self.num_clusters}")
        if self.num_negative_prototypes < 1:
            problems.append(
                f"num_negative_prototypes must be >= 1, got {self.num_negative_prototypes}"
            )
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.kmeans_iterations < 1 or self.kmeans_restarts < 1:
            problems.append("kmeans_iterations and kmeans_restarts must be >= 1")
        if self.kmeans_max_points_per_centroid < 1:
            problems.append("kmeans_max_points_per_centroid must be >= 1")
        if self.temperature <= 0 or self.concentration_alpha <= 0:
            problems.append("temperature and concentration_alpha must be > 0")
        return problems


@dataclass(frozen=True)
class Clustering:
    """One k-means of the training set: each sample's cluster (N,), the L2-normalised
    centroids (K, D) and their concentrations φ (K,)."""

    im2cluster: Tensor
    centroids: Tensor
    density: Tensor


def pcl_eval_view(image_size: int) -> transforms.Compose:
    """PCL's ``eval_augmentation`` (Resize 256, CenterCrop 224) scaled to ``image_size``."""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            normalize(),
        ]
    )


@torch.no_grad()
def sample_negative_prototypes(
    positives: Tensor, num_clusters: int, num_negatives: int
) -> tuple[Tensor, Tensor]:
    """PCL's ``sample(set(all) − set(positives), r)`` with static shapes.

    Returns ``min(r, K)`` cluster ids in random order and a mask of those that are real
    negatives. Every id that is no positive of the batch draws a random key below 1 and
    every positive the key 2, so the ``min(r, K)`` smallest keys are ``r`` uniformly drawn
    non-positives when there are at least ``r`` of them, else all of them plus positives
    that the mask turns off. No host synchronisation.
    """
    keys = torch.rand(num_clusters, device=positives.device)
    keys.index_fill_(0, positives, 2.0)
    count = min(num_negatives, num_clusters)
    chosen = torch.topk(keys, count, largest=False, sorted=False).indices
    return chosen, keys[chosen] < 2.0


def proto_nce(
    q: Tensor,
    positives: Tensor,
    negatives: Tensor,
    negative_valid: Tensor,
    centroids: Tensor,
    density: Tensor,
) -> Tensor:
    """ProtoNCE of one clustering (``pcl/builder.py``): cross-entropy of query i over the
    columns [prototype of every query's cluster; negative prototypes], each divided by its
    prototype's φ, target column i.

    As in PCL, query j's positive column is there for query i too (a duplicate of i's own
    when both are in one cluster). Masked negatives get logit −∞. Float32, autocast off.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        columns = torch.cat([positives, negatives])
        logits = q.float() @ centroids[columns].float().T / density[columns].float()
        keep = torch.cat([torch.ones_like(positives, dtype=torch.bool), negative_valid])
        logits = logits.masked_fill(~keep, float("-inf"))
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels)


@register_method("pcl")
class PCL(MoCoV2):
    """MoCo-v2 whose queries also contrast with k-means prototypes of the whole training set.

    The head is PCL's ``fc`` replaced by Linear-ReLU-Linear with PyTorch's default init (the
    MoCo family here uses OpenSelfSup's kaiming init); the state-dict keys are the same.
    """

    config_class = PCLConfig
    cfg: PCLConfig
    wants_sample_index = True

    def __init__(self, cfg: PCLConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        #: The current epoch's clusterings; empty until the first pass after the warm-up.
        self.clusterings: list[Clustering] = []

    def build_head(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.feat_dim),
        )

    def eval_view(self) -> Callable[[Any], Tensor]:
        return pcl_eval_view(self.build_ctx.image_size)

    def wants_dataset_pass(self, ctx: StepContext) -> bool:
        return ctx.epoch >= self.cfg.warmup_epochs

    def cluster_counts(self, num_samples: int) -> list[int]:
        """The M cluster counts for a training set of ``num_samples`` images."""
        cfg = self.cfg
        if cfg.num_clusters:
            counts = list(cfg.num_clusters)
        else:
            counts = [max(2, round(f * num_samples)) for f in cfg.cluster_fractions]
        too_many = [k for k in counts if k > num_samples]
        if too_many:
            raise ValueError(f"cannot make {too_many} clusters of {num_samples} images")
        return counts

    @torch.no_grad()
    def embed_dataset(self, batches: Iterable[tuple[Tensor, Tensor]], num_samples: int) -> Tensor:
        """Momentum-encoder features (N, D) of every sample, on every rank (``compute_features``).

        Each process places its features by index; one all-reduce of features and a count
        column sums the shares, and dividing by the count undoes the samples that
        ``DistributedSampler`` padding embedded twice (PCL halves rows of norm > 1.5).
        Every rank first takes rank 0's BatchNorm running statistics: the engine keeps them
        per process, while PCL's DDP broadcasts rank 0's buffers at every forward, so its
        eval-mode features come from one encoder whichever rank computes them.
        """
        encoder = self.encoder_k
        if is_distributed():
            for buffer in encoder.buffers():
                dist.broadcast(buffer, src=0)
        was_training = encoder.training
        encoder.eval()
        device = self.queue.queue.device
        dim = self.cfg.feat_dim
        acc = torch.zeros(num_samples, dim + 1, device=device)
        try:
            for index, images in batches:
                feats = self.embed(encoder, images)
                ones = feats.new_ones(feats.shape[0], 1)
                acc.index_add_(0, index.to(device), torch.cat([feats, ones], dim=1))
        finally:
            encoder.train(was_training)
        if is_distributed():
            dist.all_reduce(acc)
        counts = acc[:, dim]
        missing = int((counts == 0).sum())
        if missing:
            raise RuntimeError(f"the dataset pass embedded no feature for {missing} samples")
        return acc[:, :dim] / counts.unsqueeze(1)

    @torch.no_grad()
    def cluster(self, features: Tensor) -> list[Clustering]:
        """PCL's ``run_kmeans`` for every cluster count (on one process)."""
        cfg = self.cfg
        result = []
        for m, k in enumerate(self.cluster_counts(features.shape[0])):
            km = kmeans(
                features,
                k,
                cfg.kmeans_iterations,
                cfg.kmeans_restarts,
                cfg.kmeans_seed + m,
                cfg.kmeans_max_points_per_centroid,
            )
            density = concentration(
                km.sq_distances, km.labels, k, cfg.temperature, cfg.concentration_alpha
            )
            result.append(Clustering(km.labels, F.normalize(km.centroids, dim=1), density))
        return result

    def on_dataset_pass(
        self, batches: Iterable[tuple[Tensor, Tensor]], num_samples: int, ctx: StepContext
    ) -> dict[str, float]:
        """Embed, cluster on rank 0, broadcast: every rank trains on the same clustering.

        Rank 0 clusters (as PCL) rather than every rank with the same seed: k-means sums
        with atomic adds on the GPU, so ranks could drift apart in the last bits and then
        disagree on assignments; a broadcast costs a few MB once an epoch.
        """
        start = time.perf_counter()
        features = self.embed_dataset(batches, num_samples)
        embedded = time.perf_counter()
        dim = self.cfg.feat_dim
        if rank() == 0:
            clusterings = self.cluster(features)
        else:
            clusterings = [
                Clustering(
                    features.new_zeros(num_samples, dtype=torch.long),
                    features.new_zeros(k, dim),
                    features.new_zeros(k),
                )
                for k in self.cluster_counts(num_samples)
            ]
        if is_distributed():
            for c in clusterings:
                for t in (c.im2cluster, c.centroids, c.density):
                    dist.broadcast(t, src=0)
        self.clusterings = clusterings
        metrics = {
            "embed_time_s": embedded - start,
            "kmeans_time_s": time.perf_counter() - embedded,
        }
        for m, c in enumerate(clusterings):
            metrics[f"proto{m}_clusters"] = float((torch.bincount(c.im2cluster) > 0).sum())
        return metrics

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        enc = self.encode(views[0], views[1])
        instance = self.instance_loss(enc)
        if ctx.epoch < self.cfg.warmup_epochs:
            proto = instance.new_zeros(())
        else:
            proto = self.proto_loss(enc.q, views[2] if len(views) > 2 else None)
        return {
            "loss": instance + proto,
            "instance_loss": instance.detach(),
            "proto_loss": proto.detach(),
        }

    def proto_loss(self, q: Tensor, index: Tensor | None) -> Tensor:
        """ProtoNCE averaged over the M clusterings, for queries of dataset samples ``index``."""
        if not self.clusterings:
            raise RuntimeError(
                "PCL has no clustering after its warm-up: the engine must call "
                "on_dataset_pass at the start of every epoch >= method.warmup_epochs"
            )
        if index is None:
            raise RuntimeError("PCL needs each sample's dataset index after its two views")
        losses = []
        for c in self.clusterings:
            positives = c.im2cluster[index]
            negatives, valid = sample_negative_prototypes(
                positives, c.centroids.shape[0], self.cfg.num_negative_prototypes
            )
            losses.append(proto_nce(q, positives, negatives, valid, c.centroids, c.density))
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return (
            f"warmup_epochs={self.cfg.warmup_epochs}, "
            f"cluster_fractions={self.cfg.cluster_fractions}, num_clusters={self.cfg.num_clusters}"
        )
