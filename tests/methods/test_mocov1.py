from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from benchmark.config import load_config
from benchmark.core.registry import get_method
from benchmark.training.schedules import learning_rate
from methods.augment import MultiView
from methods.heads import LinearHead
from methods.losses import info_nce
from methods.mocov1 import MoCoV1, MoCoV1Config
from methods.mocov2 import MoCoV2
from tests.methods._moco import (
    BATCH,
    CTX,
    PERM,
    build,
    prepare_step,
)
from tests.methods._moco import views as _views


def _build(bn_batch_size: int) -> MoCoV1:
    return build("mocov1", MoCoV1Config, bn_batch_size)


def test_registered_with_paper_defaults() -> None:
    assert get_method("mocov1") is MoCoV1 and MoCoV1.name == "mocov1"
    assert issubclass(MoCoV1, MoCoV2) and MoCoV1.config_class is MoCoV1Config
    cfg = MoCoV1Config()
    assert not hasattr(cfg, "hidden_dim")  # a linear head has no hidden layer
    assert (cfg.name, cfg.depth, cfg.feat_dim, cfg.queue_size) == ("mocov1", 18, 128, 16384)
    assert (cfg.momentum, cfg.temperature, cfg.shuffle_bn) == (0.999, 0.07, True)


def test_paper_and_demo_configs() -> None:
    paper = load_config("mocov1", "paper", announce=False)
    assert (paper.method.temperature, paper.method.queue_size) == (0.07, 16384)
    o = paper.optim
    assert (o.schedule, list(o.milestones), o.gamma, o.lr, o.reference_batch) == (
        "step",
        [120, 160],
        0.1,
        0.03,
        256,
    )
    assert (o.weight_decay, o.warmup_epochs, paper.pretrain.batch_size) == (1e-4, 0, 256)
    demo = load_config("mocov1", "demo", announce=False)
    assert (demo.method.temperature, demo.method.queue_size) == (0.07, 512)
    assert (demo.optim.schedule, list(demo.optim.milestones)) == ("step", [120, 160])


@pytest.mark.parametrize("epochs", [100, 200, 800])
def test_step_decay_stays_at_epochs_120_and_160(epochs: int) -> None:
    optim = load_config("mocov1", "paper", announce=False).optim
    ipe = 3  # iterations per epoch
    lrs = {e: learning_rate(optim, 0.03, epochs, e * ipe + 2, ipe) for e in (0, 99, 119, 120)}
    lrs.update({e: learning_rate(optim, 0.03, epochs, e * ipe, ipe) for e in (159, 160, 799)})
    expected = {0: 0.03, 99: 0.03, 119: 0.03, 120: 0.003, 159: 0.003, 160: 0.0003, 799: 0.0003}
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_linear_head_and_moco_v1_views() -> None:
    model = _build(8)
    for encoder in (model.encoder_q, model.encoder_k):
        head = encoder["head"]
        assert type(head) is LinearHead and (head.in_features, head.out_features) == (512, 128)
    view = model.views()
    assert isinstance(view, MultiView) and len(view.transforms) == 2
    for t in view.transforms:
        ops = [type(op) for op in t.transforms]
        assert ops == [
            transforms.RandomResizedCrop,
            transforms.RandomGrayscale,
            transforms.ColorJitter,
            transforms.RandomHorizontalFlip,
            transforms.Compose,  # normalize()
        ]
        assert t.transforms[0].size == (64, 64)
        assert t.transforms[2].hue == (-0.4, 0.4)


@pytest.mark.parametrize("bn_batch_size", [8, 4], ids=["plain_bn", "split_bn"])
def test_step_matches_hand_computation(bn_batch_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _build(bn_batch_size)
    prepare_step(model, bn_batch_size, monkeypatch, queue_ptr=None)
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue_before = model.queue.queue.clone()
    im_q, im_k = _views()

    loss = model(_views(), CTX)["loss"]

    m = 0.999
    with torch.no_grad():
        for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            p_k.copy_(m * p_k + (1 - m) * p_q)

        def embed(encoder: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
            pooled = encoder["backbone"](x).mean(dim=(2, 3))
            return F.normalize(pooled @ encoder["head"].weight.T + encoder["head"].bias, dim=1)

        q = embed(enc_q, im_q)
        k = (
            embed(enc_k, im_k[PERM])[PERM.argsort()]
            if bn_batch_size < BATCH
            else embed(enc_k, im_k)
        )
        # InfoNCE written out: -log softmax of [q·k, q·queue] / 0.07 at the positive.
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_before.T], dim=1) / 0.07
        expected = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, info_nce(q, k, queue_before, 0.07), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue.queue[:BATCH], k, rtol=1e-5, atol=1e-5)
    assert model.queue.ptr.item() == BATCH

    loss.backward()
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder_q["head"].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
