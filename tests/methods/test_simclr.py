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
import torchvision
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from benchmark.config import load_config
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method
from benchmark.training.optim import LARS, build_optimizer
from methods.augment import PILGaussianBlur, normalize, simclr_view
from methods.distributed import all_gather_with_grad
from methods.simclr import SimCLR, SimCLRConfig, SimCLRProjector, nt_xent

CTX = StepContext(epoch=0, step=0, epochs=1, steps_per_epoch=1)
BATCH = 4
SIZE = 64
TAU = 0.1


def _build(**overrides: object) -> SimCLR:
    torch.manual_seed(0)
    build = BuildContext(
        world=World(), image_size=SIZE, local_batch_size=BATCH, bn_batch_size=BATCH
    )
    return get_method("simclr")(SimCLRConfig(**overrides), build)


def _views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(2)]


def _hand_nt_xent(z: torch.Tensor, tau: float) -> float:
    """(1/2N) Σ_i [log Σ_{k≠i} exp(s_ik/τ) − s_i,pos(i)/τ], rows [view 1; view 2]."""
    rows = z.shape[0]
    s = (z @ z.T).tolist()
    total = 0.0
    for i in range(rows):
        pos = (i + rows // 2) % rows
        denominator = sum(math.exp(s[i][k] / tau) for k in range(rows) if k != i)
        total += math.log(denominator) - s[i][pos] / tau
    return total / rows


def test_registered_with_paper_defaults() -> None:
    assert get_method("simclr") is SimCLR and SimCLR.name == "simclr"
    assert SimCLR.config_class is SimCLRConfig
    assert SimCLR.sync_bn and not SimCLR.wants_sample_index
    cfg = SimCLRConfig()
    assert (cfg.depth, cfg.hidden_dim, cfg.feat_dim, cfg.temperature) == (18, 512, 128, 0.1)
    assert SimCLRConfig(temperature=0).problems() == ["temperature must be > 0, got 0"]
    assert SimCLRConfig().problems() == []


def test_nt_xent_matches_the_sum_written_out() -> None:
    # Images a, b; rows [a view 1, b view 1, a view 2, b view 2]: positives 0↔2 and 1↔3.
    z = F.normalize(
        torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.8, 0.5, 0.1], [-0.3, 0.6, 0.9]]), dim=1
    )
    s = (z @ z.T).tolist()
    e = [[math.exp(v / 0.5) for v in row] for row in s]
    expected = (
        -math.log(e[0][2] / (e[0][1] + e[0][2] + e[0][3]))
        - math.log(e[1][3] / (e[1][0] + e[1][2] + e[1][3]))
        - math.log(e[2][0] / (e[2][0] + e[2][1] + e[2][3]))
        - math.log(e[3][1] / (e[3][0] + e[3][1] + e[3][2]))
    ) / 4
    torch.testing.assert_close(nt_xent(z, 0.5), torch.tensor(expected))
    # Three images at τ = 0.1: the loop of ``_hand_nt_xent``.
    z6 = F.normalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    torch.testing.assert_close(nt_xent(z6, TAU), torch.tensor(_hand_nt_xent(z6, TAU)))


def test_nt_xent_equals_openselfsup_formulation() -> None:
    """The original's masked 2N×(2N−1) matrix on the interleaved batch gives the same loss."""
    torch.manual_seed(0)
    n = 5
    z1, z2 = F.normalize(torch.randn(n, 8), dim=1), F.normalize(torch.randn(n, 8), dim=1)
    interleaved = torch.stack([z1, z2], dim=1).reshape(2 * n, 8)  # img.reshape(2n, ...)
    s = interleaved @ interleaved.T
    mask = ~torch.eye(2 * n, dtype=torch.bool)
    s = torch.masked_select(s, mask).reshape(2 * n, -1)
    pos_ind = (torch.arange(2 * n), 2 * torch.arange(n).repeat_interleave(2))
    neg_mask = torch.ones(2 * n, 2 * n - 1, dtype=torch.bool)
    neg_mask[pos_ind] = False
    positive = s[pos_ind].unsqueeze(1)
    negative = torch.masked_select(s, neg_mask).reshape(2 * n, -1)
    logits = torch.cat([positive, negative], dim=1) / TAU
    expected = F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long))
    torch.testing.assert_close(nt_xent(torch.cat([z1, z2]), TAU), expected)


def test_nt_xent_rejects_an_odd_number_of_rows() -> None:
    with pytest.raises(ValueError, match="two views"):
        nt_xent(torch.ones(3, 2), TAU)


def test_gather_is_identity_in_one_process() -> None:
    t = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(t) is t


def test_projector_layout_and_no_bias() -> None:
    head = SimCLRProjector(512, 512, 128)
    assert [type(m) for m in head] == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
        nn.BatchNorm1d,
    ]
    fc0, bn0, _, fc1, bn1 = head
    assert (fc0.in_features, fc0.out_features, fc1.in_features, fc1.out_features) == (
        512,
        512,
        512,
        128,
    )
    assert fc0.bias is None and fc1.bias is None
    assert (bn0.num_features, bn1.num_features) == (512, 128)
    for bn in (bn0, bn1):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # kaiming(fan_in, relu): std sqrt(2 / 512) ≈ 0.0625.
    assert fc0.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    # The head's output is BN-normalised over the batch: per-feature mean 0, variance 1.
    out = head.train()(torch.randn(16, 512))
    torch.testing.assert_close(out.mean(0), torch.zeros(128), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(128), rtol=0, atol=1e-3)


def test_view_ops_in_the_original_order() -> None:
    crop, flip, jitter, gray, blur, norm = simclr_view(32).transforms
    assert type(crop) is transforms.RandomResizedCrop
    assert (crop.size, crop.scale) == ((32, 32), (0.08, 1.0))
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == transforms.InterpolationMode.BILINEAR
    assert type(flip) is transforms.RandomHorizontalFlip and flip.p == 0.5
    assert type(jitter) is transforms.RandomApply and jitter.p == 0.8
    (cj,) = jitter.transforms
    assert type(cj) is transforms.ColorJitter
    for factor in (cj.brightness, cj.contrast, cj.saturation):  # 0.8 → [1 − 0.8, 1 + 0.8]
        assert factor == pytest.approx((0.2, 1.8))
    assert cj.hue == pytest.approx((-0.2, 0.2))
    assert type(gray) is transforms.RandomGrayscale and gray.p == 0.2
    assert type(blur) is transforms.RandomApply and blur.p == 0.5
    (gauss,) = blur.transforms
    assert type(gauss) is PILGaussianBlur and gauss.sigma == (0.1, 2.0)
    assert repr(norm) == repr(normalize())


def test_views_are_two_independent_crops() -> None:
    model = _build()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), np.uint8))
    torch.manual_seed(0)
    a, b = model.views()(img)
    assert a.shape == b.shape == (3, SIZE, SIZE)
    assert not torch.equal(a, b)


def test_param_groups_exclude_exactly_bn_parameters_and_biases() -> None:
    model = _build()
    decayed, excluded = model.param_groups()
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert "weight_decay" not in decayed and not decayed.get("lars_exclude", False)
    names = {id(p): n for n, p in model.named_parameters()}
    bn_params = {
        f"{m_name}.{p_name}"
        for m_name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
        for p_name, _ in m.named_parameters(recurse=False)
    }
    biases = {n for n in names.values() if n.endswith(".bias")}
    assert {names[id(p)] for p in excluded["params"]} == bn_params | biases
    assert biases <= bn_params  # the trunk's convs and the projector's linears have no bias
    assert len(bn_params) == 2 * (20 + 2)  # 20 BN2d in ResNet-18, 2 BN1d in the projector
    # By module type: the downsample BN weight is excluded too (by name it was not).
    assert "encoder.backbone.layer2.0.downsample.1.weight" in bn_params
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert decayed_names == set(names.values()) - bn_params
    assert all(n.endswith(".weight") for n in decayed_names)
    assert "encoder.head.0.weight" in decayed_names and "encoder.head.3.weight" in decayed_names


def test_step_matches_hand_computation() -> None:
    """Forward, backward and one LARS step of the plugin against a hand-written SimCLR."""
    model = _build()
    hand = copy.deepcopy(model.encoder)
    view1, view2 = _views()
    optimizer = build_optimizer("lars", model.param_groups(), 0.3, 0.9, 1e-6, 0.001)
    assert isinstance(optimizer, LARS)

    loss = model([view1, view2], CTX)["loss"]
    loss.backward()

    # By hand: both views in one batch of 2n (one BN batch), pooled layer4, projector, L2.
    feats = hand["backbone"](torch.cat([view1, view2])).mean(dim=(2, 3))
    z = hand["head"](feats)
    z = z / z.norm(dim=1, keepdim=True)
    expected = _hand_nt_xent(z.detach(), TAU)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # The differentiable hand loss, for the gradients.
    s = z @ z.T / TAU
    n2 = z.shape[0]
    terms = [
        torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1 :]]), 0) - s[i, (i + n2 // 2) % n2]
        for i in range(n2)
    ]
    (sum(terms) / n2).backward()
    hand_params = dict(hand.named_parameters())
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(p.grad, hand_params[name].grad, rtol=1e-4, atol=1e-4 * scale)
    # BN statistics were updated over both views at once.
    torch.testing.assert_close(
        model.encoder["head"][1].running_mean, hand["head"][1].running_mean, rtol=1e-5, atol=1e-6
    )

    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    optimizer.step()
    lr, wd, eta = 0.3, 1e-6, 0.001
    for name in ("head.0.weight", "backbone.conv1.weight", "backbone.layer4.1.conv2.weight"):
        w, g = before[name], hand_params[name].grad
        local_lr = eta * w.norm() / (g.norm() + wd * w.norm())
        expected_w = w - local_lr * lr * (g + wd * w)
        torch.testing.assert_close(
            model.encoder.get_parameter(name), expected_w, rtol=1e-5, atol=1e-7
        )
    for name in ("head.4.bias", "backbone.bn1.weight", "backbone.layer2.0.downsample.1.weight"):
        w, g = before[name], hand_params[name].grad
        torch.testing.assert_close(model.encoder.get_parameter(name), w - lr * g)


def test_backbone_loads_into_torchvision_resnet18() -> None:
    model = _build()
    state = model.backbone().state_dict()
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert model.backbone() is model.encoder["backbone"]


def test_paper_and_demo_configs() -> None:
    paper = load_config("simclr", "paper", announce=False)
    o, p = paper.optim, paper.pretrain
    assert (o.name, o.lr, o.reference_batch, o.momentum) == ("lars", 0.6, 1024, 0.9)
    assert (o.trust_coefficient, o.weight_decay, o.schedule) == (0.001, 1e-6, "cosine")
    assert (o.warmup_epochs, o.warmup_ratio) == (10, 1e-4)
    assert (p.batch_size, p.bn_batch_size, p.checkpoint_every) == (1024, 1024, 10)
    assert paper.method.temperature == 0.1
    demo = load_config("simclr", "demo", announce=False)
    assert (demo.pretrain.batch_size, demo.pretrain.bn_batch_size) == (32, 32)
    assert (demo.optim.lr, demo.optim.reference_batch) == (0.6, 1024)  # 0.01875 at batch 32
    assert demo.optim.warmup_epochs < demo.pretrain.epochs


def _ddp_worker(rank: int, init_file: str, out_dir: str, x1: torch.Tensor, x2: torch.Tensor):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        n = x1.shape[0] // 2
        own = slice(rank * n, (rank + 1) * n)
        a = x1[own].clone().requires_grad_(True)
        b = x2[own].clone().requires_grad_(True)
        loss = nt_xent(F.normalize(torch.cat([a, b]), dim=1), TAU)
        loss.backward()
        # A linear projector under DDP: its averaged gradient is the full-batch gradient.
        torch.manual_seed(0)
        proj = DistributedDataParallel(nn.Linear(x1.shape[1], 4))
        z = F.normalize(proj(torch.cat([x1[own], x2[own]])), dim=1)
        nt_xent(z, TAU).backward()
        torch.save(
            {"loss": loss.detach(), "a": a.grad, "b": b.grad, "w": proj.module.weight.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gather_gives_full_batch_loss_and_gradients(tmp_path: Path) -> None:
    torch.manual_seed(3)
    x1, x2 = torch.randn(6, 5), torch.randn(6, 5)  # 3 images per rank
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), x1, x2), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
    full = nt_xent(F.normalize(torch.cat([a, b]), dim=1), TAU)
    full.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full.detach())
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # each rank its own rows
    # Each rank holds d(Σ_ranks loss)/d(own rows); DDP's 1/world_size average makes it the
    # full-batch gradient, so both ranks' inputs get the single-process rows.
    for r, res in enumerate(ranks):
        own = slice(3 * r, 3 * r + 3)
        torch.testing.assert_close(res["a"] / 2, a.grad[own], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["b"] / 2, b.grad[own], rtol=1e-5, atol=1e-7)
        assert res["a"].abs().sum() > 0

    torch.manual_seed(0)
    proj = nn.Linear(5, 4)
    nt_xent(F.normalize(proj(torch.cat([x1, x2])), dim=1), TAU).backward()
    for res in ranks:
        torch.testing.assert_close(res["w"], proj.weight.grad, rtol=1e-5, atol=1e-7)
