from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from benchmark.core.registry import get_method
from methods.losses import info_nce
from methods.mocov2 import MoCoV2, MoCoV2Config
from methods.shuffle_bn import SplitBatchNorm2d
from tests.methods._moco import (
    BATCH,
    CTX,
    PERM,
    assert_moco_v2_defaults,
    build,
    fix_key_shuffle,
    prepare_step,
)
from tests.methods._moco import views as _views


def _build(bn_batch_size: int, **overrides: object) -> MoCoV2:
    return build("mocov2", MoCoV2Config, bn_batch_size, **overrides)


def _embed(encoder: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(encoder["head"](encoder["backbone"](x).mean(dim=(2, 3))), dim=1)


def test_registered_with_paper_defaults() -> None:
    assert get_method("mocov2") is MoCoV2
    assert MoCoV2.config_class is MoCoV2Config and MoCoV2.name == "mocov2"
    cfg = MoCoV2Config()
    assert_moco_v2_defaults(cfg, "mocov2")


@pytest.mark.parametrize("bn_batch_size", [8, 4], ids=["plain_bn", "split_bn"])
def test_step_matches_hand_computation(bn_batch_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _build(bn_batch_size)
    prepare_step(model, bn_batch_size, monkeypatch)
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue_before = model.queue.queue.clone()
    k_params_before = [p.clone() for p in model.encoder_k.parameters()]
    im_q, im_k = _views()

    loss = model(_views(), CTX)["loss"]

    m = model.cfg.momentum
    with torch.no_grad():
        for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            p_k.copy_(m * p_k + (1 - m) * p_q)
        q = _embed(enc_q, im_q)
        if bn_batch_size < BATCH:
            k = _embed(enc_k, im_k[PERM])[PERM.argsort()]
            assert (k - _embed(copy.deepcopy(enc_k), im_k)).abs().max() > 1e-4  # groups matter
        else:
            k = _embed(enc_k, im_k)
        expected = info_nce(q, k, queue_before, model.cfg.temperature)
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    # The queue now holds this step's keys at the old pointer, wrapping past the end.
    rows = torch.tensor([16, 17, 18, 19, 0, 1, 2, 3])
    torch.testing.assert_close(model.queue.queue[rows], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue.queue[4:16], queue_before[4:16], rtol=0, atol=0)
    assert model.queue.ptr.item() == 4

    # encoder_k moved by exactly the EMA formula; its BN stats come from its own forward.
    for p, before, p_q in zip(
        model.encoder_k.parameters(), k_params_before, model.encoder_q.parameters(), strict=True
    ):
        torch.testing.assert_close(p, m * before + (1 - m) * p_q, rtol=0, atol=1e-7)
    bn_k, bn_hand = model.encoder_k["backbone"].bn1, enc_k["backbone"].bn1
    torch.testing.assert_close(bn_k.running_mean, bn_hand.running_mean, rtol=1e-5, atol=1e-6)

    loss.backward()
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder_q["head"][0].weight.grad.abs().sum() > 0
    for p in model.encoder_k.parameters():
        assert p.grad is None and not p.requires_grad
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.encoder_q.parameters()}


@pytest.mark.parametrize("key_map", ["none", "unshuffled", "shuffled"])
def test_encode_step_returns_maps_in_the_order_asked(
    key_map: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build(4)  # split BN: the key shuffle changes the key features
    fix_key_shuffle(monkeypatch)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.01 * torch.randn_like(p))
    enc_q, enc_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue_before, ptr_before = model.queue.queue.clone(), model.queue.ptr.clone()
    im_q, im_k = _views()

    enc = model.encode(im_q, im_k, key_map=key_map)  # type: ignore[arg-type]

    m = model.cfg.momentum
    with torch.no_grad():
        for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            p_k.copy_(m * p_k + (1 - m) * p_q)
        feat_q = enc_q["backbone"](im_q)
        feat_k_shuffled = enc_k["backbone"](im_k[PERM])
        k = F.normalize(enc_k["head"](feat_k_shuffled.mean((2, 3))), dim=1)[PERM.argsort()]
    torch.testing.assert_close(enc.feat_q, feat_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.q, _embed(enc_q, im_q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.k, k, rtol=1e-5, atol=1e-5)
    assert enc.q.requires_grad and enc.feat_q.requires_grad and not enc.k.requires_grad
    if key_map == "none":
        assert enc.feat_k is None
    else:
        expected = feat_k_shuffled if key_map == "shuffled" else feat_k_shuffled[PERM.argsort()]
        # Maps are compared looser than losses: the hand EMA rounds differently, and the
        # difference grows over the trunk; rows of other images differ by orders more.
        torch.testing.assert_close(enc.feat_k, expected, rtol=1e-4, atol=1e-4)
        assert not enc.feat_k.requires_grad
    # Encoding alone leaves the queue alone; instance_loss uses it, then enqueues the keys.
    assert torch.equal(model.queue.queue, queue_before) and torch.equal(model.queue.ptr, ptr_before)
    loss = model.instance_loss(enc)
    torch.testing.assert_close(loss, info_nce(enc.q, k, queue_before, 0.2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.queue.queue[:BATCH], k, rtol=1e-5, atol=1e-5)


def test_encode_rejects_an_unknown_key_map() -> None:
    with pytest.raises(ValueError, match="key_map must be one of none, unshuffled, shuffled"):
        _build(8).encode(*_views(), key_map="sorted")  # type: ignore[arg-type]


def test_real_shuffle_split_bn_step_runs() -> None:
    model = _build(4)
    out = model(_views(), CTX)
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    assert model.queue.ptr.item() == BATCH
    torch.testing.assert_close(model.queue.queue[:BATCH].norm(dim=1), torch.ones(BATCH))


@pytest.mark.parametrize("bn_batch_size", [8, 2])
def test_backbone_loads_into_torchvision_resnet18(bn_batch_size: int) -> None:
    model = _build(bn_batch_size)
    state = model.backbone().state_dict()
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(net.layer4[1].bn2.weight, state["layer4.1.bn2.weight"])
    assert model.backbone() is model.encoder_q["backbone"]


def test_bn_layers_follow_bn_splits() -> None:
    split = _build(2)
    for encoder in (split.encoder_q, split.encoder_k):
        bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 20
        assert all(type(m) is SplitBatchNorm2d and m.num_splits == 4 for m in bns)
    plain = _build(8)
    assert all(type(m) is nn.BatchNorm2d for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_encoders_start_equal_and_views_are_two_crops() -> None:
    model = _build(8)
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(p_q, p_k, rtol=0, atol=0)
    head = model.encoder_q["head"]
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 512, 128)
    assert torch.all(head[0].bias == 0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), np.uint8))
    views = model.views()(img)
    assert [v.shape for v in views] == [(3, 64, 64), (3, 64, 64)]
