"""ConCL's training step against a hand computation that follows the released code's loops."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods.concl as concl_module
import methods.mocov2 as mocov2_module
from benchmark.config import ConfigError, load_config
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method
from methods.concepts import match_concepts
from methods.concl import ConCL, ConCLConfig
from methods.mocov2 import MoCoV2, MoCoV2Config

BATCH, SIZE, K = 8, 64, 3
PERM = torch.tensor([3, 0, 5, 1, 7, 2, 6, 4])
WARM = StepContext(epoch=0, step=0, epochs=2, steps_per_epoch=1)
AFTER = StepContext(epoch=1, step=1, epochs=2, steps_per_epoch=1)


def _build(cls: type[nn.Module] = ConCL, bn_batch_size: int = 4, **overrides: object):
    torch.manual_seed(0)
    config_class = ConCLConfig if cls is ConCL else MoCoV2Config
    defaults = {"queue_size": 32}
    if cls is ConCL:
        defaults.update(num_concepts=K, concept_queue_size=40, warmup_epochs=1)
    cfg = config_class(**{**defaults, **overrides})
    build = BuildContext(World(), SIZE, BATCH, bn_batch_size)
    return cls(cfg, build)


def _views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(3)]
    top_left = torch.rand(BATCH, 2, 2, generator=g) * 0.4
    flips = (torch.rand(BATCH, 2, 1, generator=g) < 0.5).float()
    boxes = torch.cat([top_left, top_left + 0.6, flips], dim=2)  # (B, 2, 5)
    return [*images, boxes]


#: The reference clustering the tests impose (layer3 of a 64 px view is 4×4).
LABELS = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 2, 2]]).repeat(BATCH, 1, 1)
LABELS[1] = 0  # one concept only in image 1


def _fix_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    # The key shuffle is drawn in MoCo-v2's encode step, which ConCL's step runs.
    monkeypatch.setattr(mocov2_module, "batch_shuffle", lambda x: (x[PERM], PERM.argsort()))
    monkeypatch.setattr(concl_module, "cosine_kmeans", lambda x, k, iters: LABELS.flatten(1))


def test_registered_with_paper_defaults() -> None:
    assert get_method("concl") is ConCL
    cfg = ConCLConfig()
    assert (cfg.num_concepts, cfg.kmeans_iterations, cfg.cluster_layer) == (8, 10, "layer3")
    assert (cfg.concept_weight, cfg.temperature, cfg.concept_temperature) == (1.0, 0.2, 0.2)
    assert (cfg.queue_size, cfg.concept_queue_size, cfg.momentum) == (16384, 16384, 0.999)
    assert (cfg.warmup_epochs, cfg.reproduce_shuffle_bug, cfg.shuffle_bn) == (20, False, True)
    # K·B key prototypes per process and step, or 4·B when K > 8 (``num_sampled_protos`` in
    # TencentAILabHealthcare/ConCL openselfsup/models/concl.py)
    assert _build(num_concepts=8, concept_queue_size=64).prototypes_per_step == 8 * BATCH
    assert _build(num_concepts=12, concept_queue_size=64).prototypes_per_step == 4 * BATCH


def test_warm_up_step_is_exactly_moco_v2() -> None:
    concl, moco = _build(ConCL), _build(MoCoV2)
    torch.manual_seed(5)
    out = concl(_views(), WARM)
    torch.manual_seed(5)
    expected = moco(_views()[:2], WARM)["loss"]
    assert torch.allclose(out["loss"], expected)
    assert float(out["concept_loss"]) == 0.0 and float(out["concept_pairs"]) == 0.0
    assert torch.equal(concl.concept_queue.ptr, torch.tensor(0))  # nothing enqueued


def _infonce_rows(q: torch.Tensor, k: torch.Tensor, neg: torch.Tensor, tau: float):
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ neg.T], dim=1) / tau
    return -torch.log_softmax(logits, dim=1)[:, 0]


@pytest.mark.parametrize("bug", [False, True], ids=["unshuffled", "reproduce_shuffle_bug"])
def test_step_after_warm_up_matches_hand_computation(
    bug: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fix_randomness(monkeypatch)
    model = _build(concept_weight=0.7, reproduce_shuffle_bug=bug)
    with torch.no_grad():
        for p in model.encoder_k.parameters():  # make the EMA visible
            p.add_(0.01 * torch.randn_like(p))
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue = model.queue.queue.clone()
    concept_queue = model.concept_queue.queue.clone()
    im_q, im_k, _, boxes = _views()

    out = model(_views(), AFTER)

    m = model.cfg.momentum
    with torch.no_grad():
        for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            p_k.copy_(m * p_k + (1 - m) * p_q)
        feat_q = enc_q["backbone"](im_q)
        q = F.normalize(enc_q["head"](feat_q.mean((2, 3))), dim=1)
        feat_k_shuffled = enc_k["backbone"](im_k[PERM])
        k = F.normalize(enc_k["head"](feat_k_shuffled.mean((2, 3))), dim=1)[PERM.argsort()]
        feat_k = feat_k_shuffled if bug else feat_k_shuffled[PERM.argsort()]
        instance = _infonce_rows(q, k, queue, 0.2).mean()
        map_q = match_concepts(LABELS, boxes[:, 0], K, (2, 2))
        map_k = match_concepts(LABELS, boxes[:, 1], K, (2, 2))
        rows_q, rows_k = [], []
        for b in range(BATCH):  # the released code's loop over images and concepts
            for c in range(K):
                in_q, in_k = map_q[b] == c, map_k[b] == c
                if in_q.any() and in_k.any():
                    rows_q.append((feat_q[b] * in_q).sum((1, 2)) / in_q.sum())
                    rows_k.append((feat_k[b] * in_k).sum((1, 2)) / in_k.sum())
        z_q = F.normalize(enc_q["head"](torch.stack(rows_q)), dim=1)
        z_k = F.normalize(enc_k["head"](torch.stack(rows_k)), dim=1)
        concept = _infonce_rows(z_q, z_k, concept_queue, 0.2).mean()

    assert torch.allclose(out["instance_loss"], instance, atol=1e-5)
    assert torch.allclose(out["concept_loss"], concept, atol=1e-5)
    assert torch.allclose(out["loss"], 0.7 * concept + 0.3 * instance, atol=1e-5)
    assert float(out["concept_pairs"]) == pytest.approx(len(rows_q) / BATCH)
    # The instance queue got this step's keys; the concept queue K·B valid key prototypes.
    assert torch.allclose(model.queue.queue[:BATCH], k, atol=1e-6)
    n = model.prototypes_per_step
    assert n == K * BATCH and int(model.concept_queue.ptr) == n
    enqueued = model.concept_queue.queue[:n]
    distance = torch.cdist(enqueued, z_k).min(dim=1).values
    assert distance.max() < 1e-5  # every enqueued row is one of the paired key prototypes
    assert torch.equal(model.concept_queue.queue[n:], concept_queue[n:])


def test_concept_loss_trains_the_query_encoder_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _fix_randomness(monkeypatch)
    model = _build(concept_weight=1.0)
    out = model(_views(), AFTER)
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    grads = [p.grad for p in model.encoder_q.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert out["concept_loss"].grad_fn is None  # logged values are detached


def test_config_layers_and_errors() -> None:
    demo = load_config("concl", "demo", announce=False)
    assert demo.method.warmup_epochs < demo.pretrain.epochs  # the demo trains concepts
    paper = load_config("concl", "paper", announce=False)
    assert (paper.method.num_concepts, paper.method.warmup_epochs) == (8, 20)
    assert (paper.optim.lr, paper.optim.schedule, paper.pretrain.batch_size) == (
        0.03,
        "cosine",
        256,
    )
    with pytest.raises(ConfigError, match="method.cluster_layer must be one of stem, layer1"):
        load_config("concl", "demo", overrides=("method.cluster_layer=layer9",), announce=False)
    with pytest.raises(ConfigError, match=r"method.concept_weight must be in \[0, 1\]"):
        load_config("concl", "demo", overrides=("method.concept_weight=1.5",), announce=False)


def test_every_ablation_file_changes_one_axis() -> None:
    base = load_config("concl", "paper", announce=False).method
    files = sorted(Path("experiments/paper/ablations").glob("concl_*.yaml"))
    # TencentAILabHealthcare/ConCL configs/NCT_pretraining/concl/ablation/: concept_num_k*
    # (K: 6), concept_weight_* (w: 5), groupping_indice_f_{1,2,3,5} (clustering layer: 4)
    assert len(files) == 15
    for path in files:
        method = load_config("concl", "paper", config_files=(path,), announce=False).method
        changed = {k for k in base if base[k] != method[k]}
        assert len(changed) == 1, (path, changed)
    w05 = load_config("concl", "paper", config_files=(files[0].parent / "concl_w05.yaml",))
    assert w05.method.concept_weight == 0.5  # not the original file's 0.3


def test_stem_concepts_cluster_the_pre_max_pool_map_and_pool_to_the_layer4_grid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cluster_layer=stem (the ablation's f1): at 224 px ConCL clusters the 64×112×112 map
    # before the max-pool, cuts it into each view and pools it to the 7×7 layer4 grid.
    seen: dict[str, object] = {}
    kmeans, match = concl_module.cosine_kmeans, concl_module.match_concepts

    def record_kmeans(x: torch.Tensor, k: int, iters: int) -> torch.Tensor:
        seen["points"] = tuple(x.shape)
        return kmeans(x, k, iters)

    def record_match(
        labels: torch.Tensor, boxes: torch.Tensor, num: int, grid: tuple[int, int]
    ) -> torch.Tensor:
        seen["labels"], seen["grid"] = tuple(labels.shape), grid
        return match(labels, boxes, num, grid)

    monkeypatch.setattr(concl_module, "cosine_kmeans", record_kmeans)
    monkeypatch.setattr(concl_module, "match_concepts", record_match)
    torch.manual_seed(0)
    cfg = ConCLConfig(
        queue_size=8, num_concepts=K, concept_queue_size=16, warmup_epochs=1, cluster_layer="stem"
    )
    model = ConCL(cfg, BuildContext(World(), 224, 2, 2))
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(2, 3, 224, 224, generator=g) for _ in range(3)]
    boxes = torch.tensor([[[0.0, 0.0, 0.8, 0.8, 0.0], [0.2, 0.2, 1.0, 1.0, 1.0]]] * 2)
    out = model([*images, boxes], AFTER)
    assert seen == {"points": (2, 112 * 112, 64), "labels": (2, 112, 112), "grid": (7, 7)}
    assert torch.isfinite(out["loss"]) and float(out["concept_pairs"]) > 0
