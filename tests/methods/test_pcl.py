"""PCL-v2: ProtoNCE, negative sampling and the epoch flow against explicit computations."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

import methods.pcl as pcl_module
from benchmark.config import ConfigError, load_config
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method
from methods.clustering import concentration, kmeans
from methods.pcl import PCL, PCLConfig, proto_nce, sample_negative_prototypes

BATCH, SIZE, N = 8, 32, 13
WARM = StepContext(epoch=0, step=0, epochs=2, steps_per_epoch=1)
AFTER = StepContext(epoch=1, step=1, epochs=2, steps_per_epoch=1)
COUNTS = [3, 5]


def _build(**overrides: object) -> PCL:
    torch.manual_seed(0)
    defaults: dict[str, object] = {
        "queue_size": 16,
        "warmup_epochs": 1,
        "num_clusters": COUNTS,
        "num_negative_prototypes": 100,  # more than any K: every other prototype
        "kmeans_iterations": 5,
        "kmeans_restarts": 2,
    }
    cfg = PCLConfig(**{**defaults, **overrides})
    return PCL(cfg, BuildContext(World(), SIZE, BATCH, BATCH))


def _images(n: int = N) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _embed(encoder: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(encoder["head"](encoder["backbone"](x).mean(dim=(2, 3))), dim=1)


def test_registered_with_paper_defaults_and_configs() -> None:
    assert get_method("pcl") is PCL and PCL.wants_sample_index
    cfg = PCLConfig()
    assert (cfg.queue_size, cfg.momentum, cfg.temperature, cfg.shuffle_bn) == (
        16384,
        0.999,
        0.2,
        True,
    )
    assert (cfg.warmup_epochs, cfg.num_negative_prototypes, cfg.concentration_alpha) == (
        20,
        16384,
        10.0,
    )
    assert (cfg.kmeans_iterations, cfg.kmeans_restarts, cfg.kmeans_max_points_per_centroid) == (
        20,
        5,
        1000,
    )
    # PCL's 25k/50k/100k of 1.28M images, as fractions.
    assert [f * 1_280_000 for f in cfg.cluster_fractions] == [25_000, 50_000, 100_000]
    paper = load_config("pcl", "paper", announce=False)
    assert (paper.optim.lr, paper.optim.schedule, paper.pretrain.batch_size) == (
        0.03,
        "cosine",
        256,
    )
    assert (paper.optim.weight_decay, paper.pretrain.bn_batch_size) == (1e-4, 32)
    assert list(paper.method.cluster_fractions) == cfg.cluster_fractions
    demo = load_config("pcl", "demo", announce=False)
    assert demo.method.warmup_epochs < demo.pretrain.epochs  # the demo clusters and trains
    build = BuildContext(World(), 96, 32, 16)
    model = PCL(PCLConfig(queue_size=64), build)
    assert model.cluster_counts(1024) == [20, 40, 80]
    assert model.cluster_counts(80_000) == [1562, 3125, 6250]
    assert PCL(PCLConfig(num_clusters=[7, 9]), build).cluster_counts(1024) == [7, 9]
    with pytest.raises(ValueError, match=r"cannot make \[9\] clusters of 8 images"):
        PCL(PCLConfig(num_clusters=[7, 9], queue_size=64), build).cluster_counts(8)
    with pytest.raises(ConfigError, match=r"method.cluster_fractions must be in \(0, 1\]"):
        load_config("pcl", "demo", overrides=("method.cluster_fractions=[0.5,2]",), announce=False)


def test_eval_view_is_pcls_center_crop_scaled_to_the_view() -> None:
    build = BuildContext(World(), 96, 32, 16)
    view = PCL(PCLConfig(queue_size=64), build).eval_view()
    resize, crop = view.transforms[0], view.transforms[1]
    assert (resize.size, crop.size) == (110, (96, 96))  # 96 · 256/224 = 109.7
    g = torch.Generator().manual_seed(0)
    array = (torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(array)
    expected = img.resize((110, 110), Image.BILINEAR).crop((7, 7, 103, 103))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = (torch.from_numpy(np.array(expected)).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(view(img), ref, atol=0.05, rtol=0)  # PIL vs tensor resize
    paper = PCL(PCLConfig(queue_size=64), BuildContext(World(), 224, 32, 16)).eval_view()
    assert (paper.transforms[0].size, paper.transforms[1].size) == (256, (224, 224))


def test_negatives_are_r_distinct_non_positives() -> None:
    torch.manual_seed(0)
    positives = torch.tensor([3, 7, 3, 0, 12, 7])
    seen: set[int] = set()
    for _ in range(50):
        neg, valid = sample_negative_prototypes(positives, 20, 6)
        assert neg.shape == (6,) and valid.all()
        assert neg.unique().numel() == 6
        assert not set(neg.tolist()) & {0, 3, 7, 12}
        seen |= set(neg.tolist())
    assert seen == set(range(20)) - {0, 3, 7, 12}  # every non-positive gets drawn


@pytest.mark.parametrize("r", [16, 30])
def test_with_too_few_clusters_all_others_are_negatives(r: int) -> None:
    positives = torch.tensor([3, 7, 3, 0, 12, 7])
    neg, valid = sample_negative_prototypes(positives, 20, r)
    assert neg.shape == (min(r, 20),) and neg.unique().numel() == min(r, 20)
    assert set(neg[valid].tolist()) == set(range(20)) - {0, 3, 7, 12}
    assert set(neg[~valid].tolist()) <= {0, 3, 7, 12}


def test_proto_nce_matches_explicit_loops() -> None:
    g = torch.Generator().manual_seed(0)
    k, b = 7, 4
    q = F.normalize(torch.randn(b, 16, generator=g), dim=1).requires_grad_(True)
    centroids = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    density = torch.rand(k, generator=g) * 0.3 + 0.05
    positives = torch.tensor([2, 5, 2, 0])
    negatives = torch.tensor([6, 2, 1, 4, 0])  # 2 and 0 are positives: masked
    valid = torch.tensor([True, False, True, True, False])
    loss = proto_nce(q, positives, negatives, valid, centroids, density)

    q_ = q.detach()
    columns = [2, 5, 2, 0, 6, 1, 4]  # the positives of every query, then the real negatives
    expected = 0.0
    for i in range(b):
        logits = [float(q_[i] @ centroids[c]) / float(density[c]) for c in columns]
        expected += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    assert float(loss.detach()) == pytest.approx(expected / b, rel=1e-5)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_dataset_pass_only_after_warmup_and_clustering_not_in_checkpoint() -> None:
    model = _build(warmup_epochs=3)
    assert [model.wants_dataset_pass(StepContext(e, 0, 5, 1)) for e in range(5)] == [
        False,
        False,
        False,
        True,
        True,
    ]
    images = _images(BATCH)
    views = [images, images, torch.arange(BATCH)]
    with pytest.raises(RuntimeError, match="no clustering after its warm-up"):
        model(views, StepContext(3, 0, 5, 1))
    keys = set(model.state_dict())
    zero = torch.zeros(N, dtype=torch.long)
    model.clusterings = [pcl_module.Clustering(zero, torch.ones(1, 128), torch.ones(1))]
    assert set(model.state_dict()) == keys  # not checkpointed: a resumed run re-clusters
    resumed = _build(warmup_epochs=3)
    resumed.load_state_dict(model.state_dict())
    assert resumed.clusterings == [] and resumed.wants_dataset_pass(StepContext(4, 0, 5, 1))


def test_epoch_flow_matches_hand_computation() -> None:
    model = _build()
    with torch.no_grad():
        for p in model.encoder_k.parameters():  # keys differ from queries
            p.add_(0.01 * torch.randn_like(p))
    images = _images()
    order = torch.tensor([4, 11, 0, 7, 2, 9, 12, 1, 5, 3, 10, 6, 8])
    batches = [(order[:8], images[order[:8]]), (order[8:], images[order[8:]])]
    enc_k = copy.deepcopy(model.encoder_k).eval()
    with torch.no_grad():
        features = _embed(enc_k, images)

    metrics = model.on_dataset_pass(iter(batches), N, AFTER)
    assert model.encoder_k.training  # eval only for the pass
    assert len(model.clusterings) == 2
    gathered = model.embed_dataset(iter(batches), N)  # what the pass clustered
    torch.testing.assert_close(gathered, features)  # placed by index
    for m, (k, c) in enumerate(zip(COUNTS, model.clusterings, strict=True)):
        km = kmeans(gathered, k, 5, 2, seed=m)
        assert torch.equal(c.im2cluster, km.labels)
        torch.testing.assert_close(c.centroids, F.normalize(km.centroids, dim=1))
        torch.testing.assert_close(c.density, concentration(km.sq_distances, km.labels, k, 0.2))
        assert metrics[f"proto{m}_clusters"] == float(km.labels.unique().numel())
    assert metrics["embed_time_s"] > 0 and metrics["kmeans_time_s"] > 0

    index = torch.tensor([5, 0, 11, 3, 7, 2, 9, 1])
    g = torch.Generator().manual_seed(1)
    im_q, im_k = (torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(2))
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue = model.queue.queue.clone()
    out = model([im_q, im_k, index], AFTER)

    m_ = model.cfg.momentum
    with torch.no_grad():
        for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            p_k.copy_(m_ * p_k + (1 - m_) * p_q)
        k = _embed(enc_k, im_k)  # one BN group: the key shuffle changes nothing
        q = _embed(enc_q, im_q)
    instance = 0.0
    for i in range(BATCH):
        logits = torch.cat([(q[i] * k[i]).sum().view(1), queue @ q[i]]) / 0.2
        instance += float(-torch.log_softmax(logits, dim=0)[0])
    instance /= BATCH
    proto = 0.0
    for c in model.clusterings:
        pos = c.im2cluster[index].tolist()
        columns = pos + [j for j in range(c.centroids.shape[0]) if j not in pos]
        for i in range(BATCH):
            logits = torch.stack([q[i] @ c.centroids[j] / c.density[j] for j in columns])
            proto += float(-torch.log_softmax(logits, dim=0)[i]) / BATCH
    proto /= len(model.clusterings)
    assert float(out["instance_loss"]) == pytest.approx(instance, rel=1e-4)
    assert float(out["proto_loss"]) == pytest.approx(proto, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(instance + proto, rel=1e-4)
    out["loss"].backward()

    warm = model([im_q, im_k, index], WARM)
    assert float(warm["proto_loss"]) == 0.0
    assert float(warm["loss"].detach()) == float(warm["instance_loss"])


def _tiny_encoder() -> nn.ModuleDict:
    """Stands in for the momentum ResNet in the 2-process test: the plumbing is under test."""
    torch.manual_seed(3)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU())
    return nn.ModuleDict({"backbone": backbone, "head": nn.Linear(16, 128)})


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _build()
        model.encoder_k = _tiny_encoder()
        if rank == 1:  # per-process BN statistics: the pass must use rank 0's
            model.encoder_k["backbone"][1].running_mean.add_(1.0)
        torch.manual_seed(100 + rank)  # different RNG per rank: only rank 0's result counts
        calls = []
        real = pcl_module.kmeans
        pcl_module.kmeans = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        images = _images()
        # DistributedSampler(shuffle=False) over 13 samples: rank 1's share is padded with 0.
        share = torch.arange(rank, N + 1, 2) % N
        batches = [(idx, images[idx]) for idx in share.split(4)]
        model.on_dataset_pass(iter(batches), N, AFTER)
        features = model.embed_dataset(iter(batches), N)
        clusterings = [(c.im2cluster, c.centroids, c.density) for c in model.clusterings]
        torch.save(
            {"clusterings": clusterings, "features": features, "calls": len(calls)},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_share_rank_zeros_clustering(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["calls"], r1["calls"]) == (len(COUNTS), 0)  # rank 0 clusters, rank 1 receives
    for a, b in zip(r0["clusterings"], r1["clusterings"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert torch.equal(r0["features"], r1["features"])
    with torch.no_grad():  # rank 0's encoder on every sample; the padded duplicate averaged away
        expected = _embed(_tiny_encoder().eval(), _images())
    torch.testing.assert_close(r0["features"], expected)
