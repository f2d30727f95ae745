"""BYOL's loss, momentum schedule, EMA order and views against hand computations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms

from benchmark.config import ConfigError, load_config
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method
from benchmark.training.schedules import scaled_lr
from methods.augment import PILGaussianBlur, byol_views, normalize
from methods.byol import BYOL, BYOLConfig, LocalBatchNorm1d, byol_loss, target_momentum

BATCH, SIZE = 8, 32


def _build(batch: int = BATCH, **overrides: object) -> BYOL:
    torch.manual_seed(0)
    cfg = BYOLConfig(**{"head_bn_batch_size": batch, **overrides})
    return BYOL(cfg, BuildContext(World(), SIZE, batch, batch))


def _views(batch: int = BATCH) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(2)]


def _image(h: int = 20, w: int = 20) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _perturb_target(model: BYOL) -> None:
    """Make the target differ from the online network, so an EMA is visible."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_registered_with_paper_defaults() -> None:
    assert get_method("byol") is BYOL and BYOL.name == "byol"
    assert BYOL.sync_bn and not BYOL.wants_sample_index
    cfg = BYOLConfig()
    assert (cfg.depth, cfg.projector_hidden_dim, cfg.feat_dim, cfg.predictor_hidden_dim) == (
        18,
        512,
        256,
        512,
    )
    assert (cfg.base_momentum, cfg.end_momentum, cfg.head_bn_batch_size) == (0.996, 1.0, 128)
    assert cfg.problems() == []
    assert len(BYOLConfig(base_momentum=0.9, end_momentum=0.5).problems()) == 1
    assert len(BYOLConfig(head_bn_batch_size=1).problems()) == 1


def test_loss_by_hand() -> None:
    p = torch.tensor([[3.0, 4.0, 0.0], [2.0, 0.0, 0.0]])
    z = torch.tensor([[4.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    # cosines 24/25 and 0: 2 - 2 * (0.96 + 0) / 2
    torch.testing.assert_close(byol_loss(p, z), torch.tensor(1.04))
    # The original's -2 * sum(cos) / N is the same loss less the constant 2.
    original = -2 * F.cosine_similarity(p, z, dim=1).sum() / 2
    torch.testing.assert_close(byol_loss(p, z) - 2, original)
    # Scale-free in both arguments; 0 at perfect alignment.
    torch.testing.assert_close(byol_loss(5 * p, 0.1 * p), torch.tensor(0.0))


def test_momentum_schedule_values() -> None:
    total = 1000
    assert target_momentum(0, total, 0.996) == pytest.approx(0.996, abs=1e-12)
    assert target_momentum(total // 2, total, 0.996) == pytest.approx(0.998, abs=1e-12)
    assert target_momentum(total, total, 0.996) == pytest.approx(1.0, abs=1e-12)
    quarter = 1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2
    assert target_momentum(250, total, 0.996) == pytest.approx(quarter, abs=1e-12)
    assert quarter == pytest.approx(0.99658579, abs=1e-8)
    values = [target_momentum(t, total, 0.996) for t in range(total + 1)]
    assert values == sorted(values)
    assert target_momentum(5, 10, 0.9, end=0.99) == pytest.approx(0.945, abs=1e-12)


def test_on_step_end_applies_scheduled_ema() -> None:
    model = _build()
    _perturb_target(model)
    before = [p.clone() for p in model.target.parameters()]
    running = model.target["backbone"].bn1.running_mean.clone()
    ctx = StepContext(epoch=1, step=5, epochs=2, steps_per_epoch=4)  # step 5 of 8
    m = 1 - 0.004 * (math.cos(math.pi * 5 / 8) + 1) / 2
    model.on_step_end(ctx)
    online = list(model.online.parameters())
    assert len(online) == len(before)
    for p, b, o in zip(model.target.parameters(), before, online, strict=True):
        torch.testing.assert_close(p, m * b + (1 - m) * o, rtol=0, atol=1e-7)
    # Buffers (BN running stats) are the target's own.
    torch.testing.assert_close(model.target["backbone"].bn1.running_mean, running, rtol=0, atol=0)
    # The predictor has no target twin.
    assert not any(p is q for p in model.predictor.parameters() for q in model.target.parameters())


def test_gradients_reach_online_and_predictor_only() -> None:
    model = _build()
    model(_views(), StepContext(0, 0, 1, 1))["loss"].backward()
    for name, p in [*model.online.named_parameters(), *model.predictor.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for p in model.target.parameters():
        assert p.grad is None and not p.requires_grad
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in [*model.online.parameters(), *model.predictor.parameters()]}


def test_full_step_matches_hand_computation() -> None:
    """Loss of both view orders, SGD step, then the EMA with the *updated* online weights."""
    model = _build()
    _perturb_target(model)
    online, predictor, target = (
        copy.deepcopy(model.online),
        copy.deepcopy(model.predictor),
        copy.deepcopy(model.target),
    )
    lr = 0.5
    optimizer = torch.optim.SGD(model.param_groups(), lr=lr)
    ctx = StepContext(epoch=0, step=1, epochs=1, steps_per_epoch=4)
    im_1, im_2 = _views()

    loss = model(_views(), ctx)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.on_step_end(ctx)

    def project(net: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        return net["projector"](net["backbone"](x).mean(dim=(2, 3)))

    p_1, p_2 = predictor(project(online, im_1)), predictor(project(online, im_2))
    with torch.no_grad():
        z_1, z_2 = project(target, im_1), project(target, im_2)
    # Per direction mean(2 - 2cos), summed over both directions.
    d_12 = (2 - 2 * F.cosine_similarity(p_1, z_2, dim=1)).mean()
    d_21 = (2 - 2 * F.cosine_similarity(p_2, z_1, dim=1)).mean()
    expected = d_12 + d_21
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    expected.backward()
    hand_params = [*online.parameters(), *predictor.parameters()]
    with torch.no_grad():
        for p in hand_params:
            p.sub_(lr * p.grad)
    for p, hand in zip(
        [*model.online.parameters(), *model.predictor.parameters()], hand_params, strict=True
    ):
        torch.testing.assert_close(p, hand, rtol=1e-4, atol=1e-6)

    m = 1 - 0.004 * (math.cos(math.pi * 1 / 4) + 1) / 2
    for p, t, o in zip(
        model.target.parameters(), target.parameters(), online.parameters(), strict=True
    ):
        torch.testing.assert_close(p, m * t + (1 - m) * o, rtol=1e-5, atol=1e-6)
    # The target's BN ran on each view as its own batch, in train mode.
    torch.testing.assert_close(
        model.target["projector"][1].running_var,
        target["projector"][1].running_var,
        rtol=1e-5,
        atol=1e-6,
    )


def test_local_batchnorm1d_groups_by_hand() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=g) * 2 + 1
    bn = LocalBatchNorm1d(3, group_size=4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    out = bn(x)
    refs = []
    for r in range(2):  # row i is in group i % 2
        ref = nn.BatchNorm1d(3)  # fresh running stats, as bn had before its forward
        with torch.no_grad():
            ref.weight.copy_(bn.weight)
            ref.bias.copy_(bn.bias)
        torch.testing.assert_close(out[r::2], ref(x[r::2]), rtol=1e-5, atol=1e-6)
        refs.append(ref)
    mean = (refs[0].running_mean + refs[1].running_mean) / 2
    torch.testing.assert_close(bn.running_mean, mean)
    assert int(bn.num_batches_tracked) == 1
    # One group is plain BatchNorm1d; eval mode uses the running statistics.
    whole = LocalBatchNorm1d(3, group_size=8)
    torch.testing.assert_close(whole(x), nn.BatchNorm1d(3)(x), rtol=1e-5, atol=1e-6)
    bn.eval()
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-6)
    bn.train()
    with pytest.raises(ValueError):
        bn(torch.randn(6, 3))


def test_sync_bn_conversion_spares_the_heads() -> None:
    model = _build()
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trunk_bns = [m for m in model.online["backbone"].modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(trunk_bns) == 20
    heads = [model.online["projector"][1], model.predictor[1], model.target["projector"][1]]
    assert all(type(m) is LocalBatchNorm1d for m in heads)
    excluded = {id(p) for p in model.param_groups()[1]["params"]}
    assert all(id(p) in excluded for m in [*trunk_bns, *heads[:2]] for p in m.parameters())


def test_param_groups_exclude_norms_and_biases_and_target() -> None:
    model = _build()
    decayed, excluded = model.param_groups()
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert "weight_decay" not in decayed and not decayed.get("lars_exclude", False)
    trained = [*model.online.parameters(), *model.predictor.parameters()]
    ids = [id(p) for p in decayed["params"]] + [id(p) for p in excluded["params"]]
    assert sorted(ids) == sorted(id(p) for p in trained)
    target = {id(p) for p in model.target.parameters()}
    assert not target & set(ids)
    # Decayed: 20 trunk convs and the 4 head Linear weights, all matrices or kernels.
    assert len(decayed["params"]) == 24 and all(p.dim() > 1 for p in decayed["params"])
    # Excluded: 20 BN2d + 2 BN1d (weight and bias) and 4 Linear biases.
    assert len(excluded["params"]) == 2 * 22 + 4 and all(p.dim() == 1 for p in excluded["params"])


def test_heads_layout_and_init() -> None:
    model = _build()
    for head, dims in (
        (model.online["projector"], (512, 512, 256)),
        (model.predictor, (256, 512, 256)),
    ):
        assert [type(m) for m in head] == [nn.Linear, LocalBatchNorm1d, nn.ReLU, nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[3].out_features) == dims
        assert torch.all(head[0].bias == 0) and torch.all(head[3].bias == 0)
        assert torch.all(head[1].weight == 1) and torch.all(head[1].bias == 0)
    # Projector kaiming fan-in (std sqrt(2/512) = 0.0625), predictor normal std 0.01.
    assert model.online["projector"][0].weight.std().item() == pytest.approx(0.0625, rel=0.02)
    assert model.predictor[0].weight.std().item() == pytest.approx(0.01, rel=0.02)
    for p_o, p_t in zip(model.online.parameters(), model.target.parameters(), strict=True):
        torch.testing.assert_close(p_o, p_t, rtol=0, atol=0)


def test_backbone_is_the_online_trunk_and_loads_into_torchvision() -> None:
    model = _build()
    assert model.backbone() is model.online["backbone"]
    net = torchvision.models.resnet18()
    result = net.load_state_dict(model.backbone().state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_views_follow_openselfsup_pipelines() -> None:
    view_1, view_2 = byol_views(SIZE)
    for view, blur_p, solarize_p in ((view_1, 1.0, 0.0), (view_2, 0.1, 0.2)):
        crop, flip, jitter, gray, blur, solarize, norm = view.transforms
        assert type(crop) is transforms.RandomResizedCrop
        assert (crop.size, crop.scale) == ((SIZE, SIZE), (0.08, 1.0))
        assert crop.interpolation == transforms.InterpolationMode.BICUBIC
        assert type(flip) is transforms.RandomHorizontalFlip and flip.p == 0.5
        assert type(jitter) is transforms.RandomApply and jitter.p == 0.8
        cj = jitter.transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
            (0.6, 1.4),
            (0.6, 1.4),
            (0.8, 1.2),
            (-0.1, 0.1),
        )
        assert type(gray) is transforms.RandomGrayscale and gray.p == 0.2
        assert type(blur) is transforms.RandomApply and blur.p == blur_p
        assert type(blur.transforms[0]) is PILGaussianBlur and blur.transforms[0].sigma == (
            0.1,
            2.0,
        )
        assert type(solarize) is transforms.RandomSolarize
        assert (solarize.threshold, solarize.p) == (128, solarize_p)
        assert repr(norm) == repr(normalize())


def test_views_blur_and_solarize_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"blur": 0, "solarize": 0}
    blur_call, solarize = PILGaussianBlur.__call__, transforms.functional.solarize

    def count(key: str, fn):  # noqa: ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN202
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(PILGaussianBlur, "__call__", count("blur", blur_call))
    monkeypatch.setattr(transforms.functional, "solarize", count("solarize", solarize))
    torch.manual_seed(0)
    view_1, view_2 = byol_views(16)
    img, n = _image(), 300
    for _ in range(n):
        view_1(img)
    assert calls == {"blur": n, "solarize": 0}
    calls.update(blur=0, solarize=0)
    for _ in range(n):
        view_2(img)
    # Binomial(300, 0.1) and (300, 0.2): means 30 and 60, sd 5.2 and 6.9.
    assert 12 <= calls["blur"] <= 50 and 35 <= calls["solarize"] <= 85


def test_solarize_is_openselfsups() -> None:
    img = Image.fromarray(
        np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3)
    )
    ours = np.asarray(transforms.RandomSolarize(128, p=1.0)(img))
    arr = np.asarray(img)
    openselfsup = np.where(arr < 128, arr, 255 - arr)  # its Solarization(threshold=128)
    assert np.array_equal(ours, openselfsup)
    assert np.array_equal(ours, np.asarray(ImageOps.solarize(img, 128)))


def test_model_views_are_two_asymmetric_tensors() -> None:
    model = _build()
    torch.manual_seed(0)
    views = model.views()(_image(40, 40))
    assert [tuple(v.shape) for v in views] == [(3, SIZE, SIZE), (3, SIZE, SIZE)]
    assert not torch.equal(views[0], views[1])


def test_head_groups_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="head_bn_batch_size"):
        _build(batch=8, head_bn_batch_size=3)
    model = _build(batch=8, head_bn_batch_size=4)
    assert model.predictor[1].group_size == 4
    assert torch.isfinite(model(_views(), StepContext(0, 0, 1, 1))["loss"])
    assert _build(batch=8, head_bn_batch_size=128).predictor[1].group_size == 8


def test_paper_and_demo_configs() -> None:
    paper = load_config("byol", "paper", announce=False)
    o, p = paper.optim, paper.pretrain
    assert (o.name, o.lr, o.reference_batch, o.momentum, o.trust_coefficient) == (
        "lars",
        0.2,
        1024,
        0.9,
        0.001,
    )
    assert (o.weight_decay, o.schedule, o.warmup_epochs, o.warmup_ratio) == (
        1.5e-6,
        "cosine",
        2,
        1e-4,
    )
    assert (p.batch_size, p.bn_batch_size, p.checkpoint_every, p.epochs) == (1024, 1024, 10, 200)
    assert scaled_lr(o.lr, p.batch_size, o.reference_batch, o.scale_lr) == pytest.approx(0.2)
    assert (paper.method.base_momentum, paper.method.end_momentum) == (0.996, 1.0)
    assert (paper.method.feat_dim, paper.method.head_bn_batch_size) == (256, 128)
    demo = load_config("byol", "demo", announce=False)
    assert (demo.pretrain.batch_size, demo.pretrain.bn_batch_size) == (32, 32)
    assert demo.optim.warmup_epochs == 1 and demo.method.head_bn_batch_size == 16
    assert scaled_lr(demo.optim.lr, 32, 1024, True) == pytest.approx(0.00625)
    with pytest.raises(ConfigError, match="base_momentum"):
        load_config("byol", "demo", overrides=("method.base_momentum=1.5",), announce=False)
