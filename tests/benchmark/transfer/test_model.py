"""The transfer detector: protocol structure, resize rule, training/eval passes, weights, decay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d, roi_align

from benchmark.transfer.model import (
    ProtocolTransform,
    RoIAlignV2Pooler,
    WeightsError,
    build_mask_rcnn,
    load_backbone,
    param_groups,
    shortest_edge_size,
)

H, W = 96, 128
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_model(**kwargs):
    """Protocol model with small proposal counts, for speed on the CPU."""
    args = dict(
        min_size_train=(64, 80),
        min_size_test=72,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_batch_size_per_image=64,
    )
    return build_mask_rcnn(**(args | kwargs))


def batch(n: int = 2) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=gen) for _ in range(n)]
    targets = []
    for _ in range(n):
        masks = torch.zeros(2, H, W, dtype=torch.uint8)
        masks[0, 10:40, 20:60] = 1
        masks[1, 50:90, 70:120] = 1
        boxes = torch.tensor([[20.0, 10.0, 60.0, 40.0], [70.0, 50.0, 120.0, 90.0]])
        targets.append({"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "masks": masks})
    return images, targets


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


def test_structure_follows_the_r18_fpn_protocol(model) -> None:
    anchors = model.rpn.anchor_generator
    assert anchors.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert all(r == (0.5, 1.0, 2.0) for r in anchors.aspect_ratios)
    assert anchors.num_anchors_per_location() == [3] * 5
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]  # P2-P5 + P6
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    assert all(f.shape[1] == 256 for f in feats.values())
    assert len(model.rpn.head.conv) == 1  # StandardRPNHead: one 3x3 conv

    heads = model.roi_heads
    assert (heads.box_head.fc6.in_features, heads.box_head.fc6.out_features) == (256 * 49, 1024)
    assert (heads.box_head.fc7.in_features, heads.box_head.fc7.out_features) == (1024, 1024)
    assert heads.box_predictor.cls_score.out_features == 2
    assert heads.box_predictor.bbox_pred.out_features == 8
    mask_convs = [m for m in heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(mask_convs) == 4 and all(c.out_channels == 256 for c in mask_convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in heads.modules())  # heads: no norm
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 2
    for pool, size in ((heads.box_roi_pool, 7), (heads.mask_roi_pool, 14)):
        assert isinstance(pool, RoIAlignV2Pooler)
        assert pool.output_size == (size, size) and pool.sampling_ratio == 0
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert model.transform.image_std == pytest.approx([0.229, 0.224, 0.225])
    assert model.rpn._post_nms_top_n == {"training": 100, "testing": 50}


def test_everything_trains_with_plain_batchnorm(model) -> None:
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    trunk_bn = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    fpn_bn = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(trunk_bn) == 20 and len(fpn_bn) == 8  # R18; FPN lateral + output convs x 4


def test_default_proposal_counts_are_detectron2s() -> None:
    m = build_mask_rcnn(min_size_train=(400, 522), min_size_test=522)
    assert m.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert m.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert m.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert m.transform.max_size == 1333 and m.transform.min_size_test == 522
    assert m.transform.min_size == tuple(range(400, 523))


def test_training_step_gives_finite_losses_and_trains_the_stem() -> None:
    torch.manual_seed(0)
    model = tiny_model().train()
    losses = model(*batch())
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.backbone.body.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_eval_gives_boxes_and_masks_at_input_size(model) -> None:
    model.eval()
    images, _ = batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o in out:
        n = len(o["boxes"])
        assert o["boxes"].shape == (n, 4) and o["scores"].shape == (n,) and 0 < n <= 100
        assert o["masks"].shape == (n, 1, H, W)
        assert (o["scores"] >= 0.05).all()


def test_resize_uses_protocol_sizes(model) -> None:
    images, targets = batch()
    t = model.transform
    t.train()
    seen = set()
    for _ in range(20):
        image_list, out = t(images, targets)
        for (h, w), target in zip(image_list.image_sizes, out, strict=True):
            assert 64 <= h <= 80 and w == round(h * W / H)
            assert target["masks"].shape[-2:] == (h, w)
            assert target["boxes"][0].tolist() == pytest.approx(
                [20 * w / W, 10 * h / H, 60 * w / W, 40 * h / H]
            )
            seen.add(h)
        assert image_list.tensors.shape[-1] % 32 == 0 and image_list.tensors.shape[-2] % 32 == 0
    assert len(seen) > 3  # sampled, not fixed
    t.eval()
    image_list, _ = t(images)
    assert image_list.image_sizes == [(72, 96), (72, 96)]


def test_shortest_edge_size_rounds_and_caps_like_detectron2() -> None:
    assert shortest_edge_size(522, 775, 522, 1333) == (522, 775)
    assert shortest_edge_size(1512, 1516, 768, 1333) == (768, 770)
    assert shortest_edge_size(100, 1000, 500, 1333) == (133, 1333)
    with pytest.raises(ValueError, match="positive"):
        ProtocolTransform((80, 64), 72, 1333, [0.0] * 3, [1.0] * 3)


def test_pooler_is_roialign_v2_on_the_right_level() -> None:
    pool = RoIAlignV2Pooler(["0", "1", "2", "3"], 7)
    feats = {str(i): torch.rand(1, 2, 64 // 2**i, 64 // 2**i) for i in range(4)}
    small = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # sqrt(area) 20 -> level 2 (P2)
    large = torch.tensor([[0.0, 0.0, 250.0, 250.0]])  # 250 -> level 4 (P4)
    assert pool.levels(torch.cat([small, large])).tolist() == [0, 2]
    out = pool(feats, [small, large], [(256, 256)] * 2)
    rois = torch.tensor([[0.0, 0.0, 0.0, 20.0, 20.0]])
    want = roi_align(feats["0"], rois, 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    assert torch.allclose(out[:1], want)
    assert not torch.allclose(out[:1], roi_align(feats["0"], rois, 7, 0.25, 0, aligned=False))


def save_resnet18(path: Path, transform=None) -> dict[str, torch.Tensor]:
    state = resnet18(weights=None).state_dict()
    state["bn1.running_mean"] += 0.5
    torch.save(transform(state) if transform else state, path)
    return state


def test_load_backbone_loads_every_trunk_tensor(model, tmp_path: Path) -> None:
    state = save_resnet18(tmp_path / "backbone.pth")
    load_backbone(model, tmp_path / "backbone.pth")
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"state_dict": {f"backbone.{k}": v for k, v in s.items()}},
    ],
)
def test_load_backbone_accepts_wrapped_and_prefixed(model, tmp_path: Path, wrap) -> None:
    state = save_resnet18(tmp_path / "w.pth", wrap)
    load_backbone(model, tmp_path / "w.pth")
    assert torch.equal(model.backbone.body.layer4[1].bn2.weight, state["layer4.1.bn2.weight"])


def _drop(s):
    return {k: v for k, v in s.items() if k != "layer3.1.conv2.weight"}


def _rename(s):
    return {k.replace("layer2.0.downsample", "layer2.0.shortcut"): v for k, v in s.items()}


def _reshape(s):
    return s | {"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_drop, "1 missing keys (layer3.1.conv2.weight)"),
        (_rename, "unexpected keys (layer2.0.shortcut"),
        (_reshape, "1 shape mismatches (layer1.0.conv1.weight (64, 64, 1, 1)"),
    ],
)
def test_load_backbone_rejects_incomplete_weights(model, tmp_path: Path, damage, words) -> None:
    save_resnet18(tmp_path / "bad.pth", damage)
    with pytest.raises(WeightsError) as err:
        load_backbone(model, tmp_path / "bad.pth")
    message = str(err.value)
    assert "\n" not in message and words in message
    assert "bad.pth" in message and "torchvision ResNet state_dict" in message


def test_load_backbone_rejects_other_files(model, tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_text("not a checkpoint\n" * 5)
    torch.save({"model": {}, "optimizer": {}, "epoch": 3}, tmp_path / "epoch_0003.pth")
    for name, words in (
        ("notes.pth", "not a readable PyTorch file"),
        ("epoch_0003.pth", "training checkpoint"),
    ):
        with pytest.raises(WeightsError) as err:
            load_backbone(model, tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value) and words in str(err.value)


def test_param_groups_exempt_norm_layers_only(model) -> None:
    groups = param_groups(model, 1e-4)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))
    bn = model.backbone.body.bn1
    assert decay[id(bn.weight)] == 0.0 and decay[id(bn.bias)] == 0.0
    fpn_bn = next(m for m in model.backbone.fpn.modules() if isinstance(m, nn.BatchNorm2d))
    assert decay[id(fpn_bn.weight)] == 0.0
    assert decay[id(model.backbone.body.conv1.weight)] == 1e-4
    assert decay[id(model.roi_heads.box_head.fc6.bias)] == 1e-4  # WEIGHT_DECAY_BIAS = WD
    n_norm = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    assert sum(p.numel() for g in groups if g["weight_decay"] == 0 for p in g["params"]) == n_norm
    assert math.isclose(groups[0]["weight_decay"], 1e-4)
