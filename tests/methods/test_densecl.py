from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from benchmark.config import load_config
from benchmark.core.contracts import BuildContext, World
from benchmark.core.registry import get_method
from methods.augment import moco_v2_view
from methods.densecl import DenseCL, DenseCLConfig, dense_info_nce, match_cells
from methods.heads import DenseHead, MLPHead
from methods.mocov2 import MoCoV2
from tests.methods._moco import (
    BATCH,
    CTX,
    PERM,
    QUEUE,
    assert_moco_v2_defaults,
    build,
    prepare_step,
)
from tests.methods._moco import views as _views


def _build(bn_batch_size: int) -> DenseCL:
    return build("densecl", DenseCLConfig, bn_batch_size)


def _reference_dense_loss(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    q_grid: torch.Tensor,
    k_grid: torch.Tensor,
    negatives: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """DenseCL's dense loss cell by cell, with explicit loops (feature inputs unnormalised)."""
    terms = []
    for b in range(q_feat.shape[0]):
        for i in range(q_feat.shape[2]):
            qf = F.normalize(q_feat[b, :, i], dim=0)
            sims = [float(qf @ F.normalize(k_feat[b, :, j], dim=0)) for j in range(k_feat.shape[2])]
            j = max(range(len(sims)), key=sims.__getitem__)
            qg = F.normalize(q_grid[b, :, i], dim=0)
            pos = qg @ F.normalize(k_grid[b, :, j], dim=0)
            neg = negatives @ qg
            logits = torch.cat([pos.view(1), neg]) / tau
            terms.append(-torch.log_softmax(logits, dim=0)[0])
    return torch.stack(terms).mean()


def test_registered_with_paper_defaults() -> None:
    assert get_method("densecl") is DenseCL and DenseCL.name == "densecl"
    assert issubclass(DenseCL, MoCoV2) and DenseCL.config_class is DenseCLConfig
    cfg = DenseCLConfig()
    assert_moco_v2_defaults(cfg, "densecl")
    assert cfg.loss_lambda == 0.5


def test_paper_and_demo_configs() -> None:
    paper = load_config("densecl", "paper", announce=False)
    m, o = paper.method, paper.optim
    assert (m.queue_size, m.temperature, m.loss_lambda, m.hidden_dim) == (16384, 0.2, 0.5, 512)
    assert (o.schedule, o.lr, o.reference_batch, o.weight_decay, o.warmup_epochs) == (
        "cosine",
        0.03,
        256,
        1e-4,
        0,
    )
    assert (paper.pretrain.batch_size, paper.pretrain.bn_batch_size) == (256, 32)
    demo = load_config("densecl", "demo", announce=False)
    assert (demo.method.queue_size, demo.method.loss_lambda) == (512, 0.5)
    model = get_method("densecl")(
        DenseCLConfig(**demo.method),
        BuildContext(World(), image_size=64, local_batch_size=32, bn_batch_size=16),
    )
    assert model.queue.size == model.queue_dense.size == 512


def test_match_cells_inverts_a_known_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    b, c, cells = 3, 16, 9
    q = F.normalize(torch.randn(b, c, cells, generator=g), dim=1)
    perms = torch.stack([torch.randperm(cells, generator=g) for _ in range(b)])
    # Key cell j holds query cell perms[b, j] (plus noise): query cell i must match the key
    # cell j with perms[b, j] == i, i.e. the inverse permutation.
    k = torch.stack([q[i][:, perms[i]] for i in range(b)])
    k = F.normalize(k + 0.05 * torch.randn(k.shape, generator=g), dim=1)
    assert torch.equal(match_cells(q, k), perms.argsort(dim=1))


def test_dense_loss_closed_form() -> None:
    # One image, two cells, D = 2. The key cells are stored swapped, and so are their
    # backbone features, so query cell 0 must match key cell 1 and vice versa.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    q_feat = torch.stack([e1, e2], dim=1).unsqueeze(0)  # (1, 2, 2): cell i = e_{i+1}
    k_feat = torch.stack([e2, e1], dim=1).unsqueeze(0)
    q_grid = torch.stack([e1, e2], dim=1).unsqueeze(0)
    k_grid = torch.stack([e2, e1], dim=1).unsqueeze(0)
    negatives = e1.view(1, 2)
    match = match_cells(q_feat, k_feat)
    assert match.tolist() == [[1, 0]]
    tau = 0.2
    loss = dense_info_nce(q_grid, k_grid, match, negatives, tau)
    # cell 0: pos 1, neg 1 -> log 2; cell 1: pos 1, neg 0 -> log(1 + e^(-1/tau)).
    expected = 0.5 * (math.log(2.0) + math.log1p(math.exp(-1.0 / tau)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # With identity matching the positives would be orthogonal: a different value.
    identity = dense_info_nce(q_grid, k_grid, torch.tensor([[0, 1]]), negatives, tau)
    assert abs(identity.item() - expected) > 1.0


def test_dense_loss_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(2)
    b, c, d, cells, k = 3, 12, 5, 4, 7
    q_feat, k_feat = torch.randn(b, c, cells, generator=g), torch.randn(b, c, cells, generator=g)
    q_grid, k_grid = torch.randn(b, d, cells, generator=g), torch.randn(b, d, cells, generator=g)
    negatives = F.normalize(torch.randn(k, d, generator=g), dim=1)
    match = match_cells(F.normalize(q_feat, dim=1), F.normalize(k_feat, dim=1))
    loss = dense_info_nce(
        F.normalize(q_grid, dim=1), F.normalize(k_grid, dim=1), match, negatives, 0.2
    )
    expected = _reference_dense_loss(q_feat, k_feat, q_grid, k_grid, negatives, 0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_heads_and_encoder_layout() -> None:
    model = _build(8)
    for encoder in (model.encoder_q, model.encoder_k):
        assert list(encoder) == ["backbone", "head", "dense_head"]
        assert type(encoder["head"]) is MLPHead and type(encoder["dense_head"]) is DenseHead
        convs = encoder["dense_head"]
        assert (convs[0].in_channels, convs[0].out_channels, convs[2].out_channels) == (
            512,
            512,
            128,
        )
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(p_q, p_k, rtol=0, atol=0)
    assert model.queue_dense.queue.shape == (QUEUE, 128)
    assert not torch.equal(model.queue_dense.queue, model.queue.queue)


@pytest.mark.parametrize("bn_batch_size", [8, 4], ids=["plain_bn", "split_bn"])
def test_step_matches_hand_computation(bn_batch_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _build(bn_batch_size)
    split = bn_batch_size < BATCH
    prepare_step(model, bn_batch_size, monkeypatch)  # DenseCL's keys go through MoCo-v2's
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue_before, dense_before = model.queue.queue.clone(), model.queue_dense.queue.clone()
    k_params_before = [p.clone() for p in model.encoder_k.parameters()]
    im_q, im_k = _views()

    out = model(_views(), CTX)

    m, tau = 0.999, 0.2
    with torch.no_grad():
        for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            p_k.copy_(m * p_k + (1 - m) * p_q)
        fq = enc_q["backbone"](im_q)
        fk = enc_k["backbone"](im_k[PERM])[PERM.argsort()] if split else enc_k["backbone"](im_k)
        assert fq.shape[2:] == (2, 2)  # 64 px -> a 2x2 layer4 grid
        q = F.normalize(enc_q["head"](fq.mean(dim=(2, 3))), dim=1)
        k = F.normalize(enc_k["head"](fk.mean(dim=(2, 3))), dim=1)
        gq, gk = enc_q["dense_head"](fq), enc_k["dense_head"](fk)
        k_pooled = F.normalize(gk.mean(dim=(2, 3)), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_before.T], dim=1) / tau
        global_loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        dense_loss = _reference_dense_loss(
            fq.flatten(2), fk.flatten(2), gq.flatten(2), gk.flatten(2), dense_before, tau
        )
    torch.testing.assert_close(out["global_loss"], global_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["dense_loss"], dense_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], 0.5 * global_loss + 0.5 * dense_loss)
    assert set(out) == {"loss", "global_loss", "dense_loss"}

    # Both queues received this step's keys: k at the wrapped pointer, k2 from the start.
    rows = torch.tensor([16, 17, 18, 19, 0, 1, 2, 3])
    torch.testing.assert_close(model.queue.queue[rows], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue_dense.queue[:BATCH], k_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue_dense.queue[BATCH:], dense_before[BATCH:])
    assert (model.queue.ptr.item(), model.queue_dense.ptr.item()) == (4, BATCH)

    # The key encoder, dense head included, moved by exactly the EMA formula.
    for p, before, p_q in zip(
        model.encoder_k.parameters(), k_params_before, model.encoder_q.parameters(), strict=True
    ):
        torch.testing.assert_close(p, m * before + (1 - m) * p_q, rtol=0, atol=1e-7)

    out["loss"].backward()
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in ("head", "dense_head"):
        assert model.encoder_q[part][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.encoder_q.parameters()}


def test_backbone_loads_into_torchvision_resnet18() -> None:
    model = _build(4)
    result = torchvision.models.resnet18().load_state_dict(
        model.backbone().state_dict(), strict=False
    )
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert model.backbone() is model.encoder_q["backbone"]


def test_real_shuffle_step_runs_and_views_are_moco_v2() -> None:
    model = _build(4)
    out = model(_views(), CTX)
    assert all(torch.isfinite(v) for v in out.values())
    assert model.queue_dense.ptr.item() == BATCH
    torch.testing.assert_close(model.queue_dense.queue[:BATCH].norm(dim=1), torch.ones(BATCH))
    views = model.views()
    assert [repr(t) for t in views.transforms] == [repr(moco_v2_view(64))] * 2
