"""ConCL's detectron2 R18-FPN Mask R-CNN ("1x" GlaS/CRAG configs) built from torchvision parts.

Every choice below reproduces a detectron2 config key of ``Base-RCNN-FPN.yaml`` +
``*_R_18_FPN_1x.yaml`` + ``*_moco.yaml`` (or a d2 default); the key is named where it is made.
Known remaining differences to detectron2 (torchvision's RPN/ROI losses): smooth-L1 with
beta 1/9 instead of d2's L1 (``SMOOTH_L1_BETA 0``), RPN losses averaged over the sampled anchors
instead of ``BATCH_SIZE_PER_IMAGE x images``, and base anchors rounded to integers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
    resize_keypoints,
)
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from benchmark.transfer.detectron2 import read_detectron2
from benchmark.transfer.weights import (
    ACCEPTED_WEIGHTS,
    WeightsError,
    check_weights_path,
    is_plain_pickle,
    read_torch_state_dict,
)

#: ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` of ConCL's ``_moco.yaml`` (RGB, 0-255), scaled to 0-1 input.
PIXEL_MEAN = tuple(v / 255.0 for v in (123.675, 116.280, 103.530))
PIXEL_STD = tuple(v / 255.0 for v in (58.395, 57.120, 57.375))
#: ``ANCHOR_GENERATOR.SIZES``/``ASPECT_RATIOS`` of ``Base-RCNN-FPN.yaml``, one size per P2-P6.
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)
#: Strides of P2-P5, the levels the ROI heads pool from (``ROI_HEADS.IN_FEATURES``).
ROI_STRIDES = (4, 8, 16, 32)
#: Background + gland: d2's ``ROI_HEADS.NUM_CLASSES 1`` does not count the background.
NUM_CLASSES = 2


def shortest_edge_size(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: shortest edge to ``size``, longest
    edge at most ``max_size``, rounded to the nearest pixel (torchvision floors a scale factor,
    which can land one pixel short, e.g. 767 for CRAG's 768)."""
    scale = size / min(h, w)
    new_h, new_w = (size, scale * w) if h < w else (scale * h, size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


class ProtocolTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with detectron2's resize rule and a separate test size.

    torchvision picks ``min_size[-1]`` at test time, so ``min_size`` cannot both hold the
    training range and the test size. Here training draws the shortest edge uniformly from
    ``min_size`` (``INPUT.MIN_SIZE_TRAIN_SAMPLING "range"``: every integer in [lo, hi]) and eval
    uses ``min_size_test`` (``INPUT.MIN_SIZE_TEST``). Images are resized with antialiasing, as
    detectron2's PIL bilinear resize does when shrinking; masks with nearest neighbour.
    """

    def __init__(
        self,
        min_size_train: tuple[int, int],
        min_size_test: int,
        max_size: int,
        image_mean: list[float],
        image_std: list[float],
    ) -> None:
        lo, hi = (int(v) for v in min_size_train)
        if not 0 < lo <= hi or min_size_test <= 0 or max_size <= 0:
            raise ValueError(
                f"image sizes must be positive with lo <= hi: min_size_train=({lo}, {hi}), "
                f"min_size_test={min_size_test}, max_size={max_size}"
            )
        # size_divisible 32: d2's FPN ``size_divisibility`` (padding so P5/P6 align).
        super().__init__(tuple(range(lo, hi + 1)), max_size, image_mean, image_std, 32)
        self.min_size_train = (lo, hi)
        self.min_size_test = int(min_size_test)

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size_test
        new_hw = shortest_edge_size(h, w, size, self.max_size)
        if new_hw != (h, w):
            image = F.interpolate(
                image[None], size=new_hw, mode="bilinear", align_corners=False, antialias=True
            )[0]
        if target is None:
            return image, None
        target["boxes"] = resize_boxes(target["boxes"], (h, w), new_hw)
        if "masks" in target and new_hw != (h, w):
            masks = target["masks"][:, None].float()
            target["masks"] = F.interpolate(masks, size=new_hw, mode="nearest")[:, 0].byte()
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), new_hw)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_size_train={self.min_size_train}, "
            f"min_size_test={self.min_size_test}, max_size={self.max_size}, "
            f"mean={[round(v, 4) for v in self.image_mean]}, "
            f"std={[round(v, 4) for v in self.image_std]}, mode='bilinear+antialias')"
        )


class RoIAlignV2Pooler(MultiScaleRoIAlign):
    """Multi-level ROIAlign as detectron2's ``ROIPooler`` with ``POOLER_TYPE "ROIAlignV2"``.

    torchvision's ``MultiScaleRoIAlign`` hard-codes ``aligned=False`` (d2's legacy "ROIAlign")
    and ``sampling_ratio=2``; d2 defaults to ``aligned=True`` (half-pixel offset) and
    ``POOLER_SAMPLING_RATIO 0`` (adaptive). Levels follow d2's ``assign_boxes_to_levels``
    (canonical box 224 on level 4, clamped to P2-P5) and scales come from the known strides,
    not inferred from the first batch. A subclass because MaskRCNN type-checks its poolers.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int,
        strides: tuple[int, ...] = ROI_STRIDES,
        sampling_ratio: int = 0,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        if len(featmap_names) != len(strides):
            raise ValueError(f"{len(featmap_names)} feature maps but {len(strides)} strides")
        super().__init__(
            list(featmap_names),
            output_size,
            sampling_ratio,
            canonical_scale=canonical_box_size,
            canonical_level=canonical_level,
        )
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))

    def levels(self, boxes: Tensor) -> Tensor:
        """Pyramid index (0 = finest) of each ``(x1, y1, x2, y2)`` box."""
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        level = torch.floor(
            self.canonical_level + torch.log2(area.sqrt() / self.canonical_scale + 1e-8)
        )
        return level.clamp(self.min_level, self.max_level).to(torch.int64) - self.min_level

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        levels = self.levels(rois[:, 1:])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(
                feat,
                rois[idx].to(feat.dtype),
                self.output_size,
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            out[idx] = pooled.to(out.dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, aligned=True)"
        )


def build_mask_rcnn(
    *,
    min_size_train: tuple[int, int],
    min_size_test: int,
    max_size: int = 1333,
    weights: str | Path | None = None,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    rpn_batch_size_per_image: int = 256,
    detections_per_img: int = 100,
) -> MaskRCNN:
    """ConCL's R18-FPN Mask R-CNN for one foreground class (gland), every layer trainable.

    ``min_size_train`` is the inclusive shortest-edge range (``INPUT.MIN_SIZE_TRAIN`` with
    ``"range"`` sampling: GlaS (400, 522), CRAG (768, 1024)); ``min_size_test`` the test
    shortest edge (GlaS 522, CRAG 768); ``max_size`` is ``INPUT.MAX_SIZE_TRAIN/TEST``.
    Proposal counts are per level before NMS and per image after NMS, as in d2's
    ``RPN.PRE_NMS_TOPK_*``/``POST_NMS_TOPK_*`` (2000/1000 train, 1000/1000 test).
    ``weights``: a ``backbone.pth`` for the ResNet trunk (``MODEL.WEIGHTS``); None = random init.
    """
    # RESNETS.NORM SyncBN + FREEZE_AT 0: plain BN (the trainer converts to SyncBN under DDP),
    # nothing frozen. torchvision's builders would put FrozenBatchNorm2d here.
    trunk = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],  # RES2_OUT_CHANNELS 64 (R18), res2-res5
        out_channels=256,  # FPN.OUT_CHANNELS
        extra_blocks=LastLevelMaxPool(),  # P6 by stride-2 subsampling of P5 (d2 LastLevelMaxPool)
        norm_layer=nn.BatchNorm2d,  # FPN.NORM SyncBN
    )
    anchors = AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS)
    model = MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors below
        min_size=min_size_test,  # replaced by ProtocolTransform below
        max_size=max_size,
        image_mean=list(PIXEL_MEAN),
        image_std=list(PIXEL_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(256, anchors.num_anchors_per_location()[0]),  # StandardRPNHead, 1 conv
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_nms_thresh=0.7,  # RPN.NMS_THRESH
        rpn_fg_iou_thresh=0.7,  # RPN.IOU_THRESHOLDS [0.3, 0.7]
        rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=rpn_batch_size_per_image,  # RPN.BATCH_SIZE_PER_IMAGE
        rpn_positive_fraction=0.5,  # RPN.POSITIVE_FRACTION
        rpn_score_thresh=0.0,
        box_roi_pool=RoIAlignV2Pooler(["0", "1", "2", "3"], 7),  # ROI_BOX_HEAD.POOLER_*
        box_head=TwoMLPHead(256 * 7 * 7, 1024),  # FastRCNNConvFCHead, NUM_FC 2, FC_DIM 1024
        box_predictor=FastRCNNPredictor(1024, NUM_CLASSES),
        box_score_thresh=0.05,  # ROI_HEADS.SCORE_THRESH_TEST
        box_nms_thresh=0.5,  # ROI_HEADS.NMS_THRESH_TEST
        box_detections_per_img=detections_per_img,  # TEST.DETECTIONS_PER_IMAGE
        box_fg_iou_thresh=0.5,  # ROI_HEADS.IOU_THRESHOLDS [0.5]
        box_bg_iou_thresh=0.5,
        box_batch_size_per_image=box_batch_size_per_image,  # ROI_HEADS.BATCH_SIZE_PER_IMAGE
        box_positive_fraction=0.25,  # ROI_HEADS.POSITIVE_FRACTION
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),  # ROI_BOX_HEAD.BBOX_REG_WEIGHTS
        mask_roi_pool=RoIAlignV2Pooler(["0", "1", "2", "3"], 14),  # ROI_MASK_HEAD.POOLER_*
        mask_head=MaskRCNNHeads(256, [256] * 4, 1),  # MaskRCNNConvUpsampleHead NUM_CONV 4, no norm
        mask_predictor=MaskRCNNPredictor(256, 256, NUM_CLASSES),  # deconv 2x + 1x1 logits
    )
    model.transform = ProtocolTransform(
        min_size_train, min_size_test, max_size, list(PIXEL_MEAN), list(PIXEL_STD)
    )
    _detectron2_head_init(model)
    if weights is not None:
        load_backbone(model, weights)
    return model


def _detectron2_head_init(model: MaskRCNN) -> None:
    """Head initialisation of detectron2 where torchvision's differs.

    ``FastRCNNConvFCHead``: c2_xavier_fill on the FCs; ``FastRCNNOutputLayers``: N(0, 0.01)
    class scores and N(0, 0.001) box deltas; ``MaskRCNNConvUpsampleHead``: c2_msra_fill on the
    deconv, N(0, 0.001) mask logits. RPN and FPN inits already agree.
    """
    heads = model.roi_heads
    for fc in (heads.box_head.fc6, heads.box_head.fc7):
        nn.init.kaiming_uniform_(fc.weight, a=1)  # c2_xavier_fill
        nn.init.zeros_(fc.bias)
    nn.init.normal_(heads.box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(heads.box_predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(heads.box_predictor.cls_score.bias)
    nn.init.zeros_(heads.box_predictor.bbox_pred.bias)
    nn.init.kaiming_normal_(
        heads.mask_predictor.conv5_mask.weight, mode="fan_out", nonlinearity="relu"
    )
    nn.init.zeros_(heads.mask_predictor.conv5_mask.bias)
    nn.init.normal_(heads.mask_predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(heads.mask_predictor.mask_fcn_logits.bias)


def read_backbone_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ResNet ``state_dict`` in ``path``: a ``torch.save`` file (``read_torch_state_dict``:
    ``module.``/``backbone.`` prefixes stripped, ``fc.*`` dropped) or a detectron2 pickle
    (``read_detectron2``, by its ``.pkl`` suffix or its content). Raises a one-line
    WeightsError for anything else (a missing file, a folder, another format)."""
    path = Path(path)
    check_weights_path(path)
    if path.suffix == ".pkl" or is_plain_pickle(path):
        return read_detectron2(path)
    return read_torch_state_dict(path)


def load_backbone(model: MaskRCNN, path: str | Path) -> None:
    """Load a torchvision ResNet ``state_dict`` into ``model.backbone.body`` (BN running
    statistics included, as MoCo's detection protocol starts from them)."""
    load_trunk_weights(model.backbone.body, path)


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet ``state_dict`` into ``trunk`` (a detector's body, or a ResNet
    without ``fc``), BN running statistics included.

    Every trunk key must be present with the right shape; only ``fc.*`` is ignored, and a
    missing ``num_batches_tracked`` (old torchvision files) is tolerated.
    """
    state = read_backbone_state_dict(path)
    _check_fit(state, trunk.state_dict(), path)
    trunk.load_state_dict(state, strict=False)


def check_backbone_file(path: str | Path) -> None:
    """Raise the one-line WeightsError ``load_trunk_weights`` would, for the detector's and the
    probes' ResNet-18 trunk, without building a model: the CLI checks ``--weights`` before any
    work, not at the first fine-tune after the probes."""
    with torch.device("meta"):
        trunk = resnet18(weights=None)
    del trunk.fc
    _check_fit(read_backbone_state_dict(path), trunk.state_dict(), path)


def _check_fit(state: dict[str, Tensor], expected: dict[str, Tensor], path: str | Path) -> None:
    """Every ``expected`` key present with its shape (``num_batches_tracked`` may be missing),
    nothing else; a one-line WeightsError listing the first offenders otherwise."""
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if found
    ]
    if problems:
        raise WeightsError(f"{path}: {'; '.join(problems)}; expected {ACCEPTED_WEIGHTS}")


#: Normalisation layers d2's ``get_default_optimizer_params`` exempts from weight decay.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d and SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """SGD parameter groups with detectron2's decay rule: ``WEIGHT_DECAY_NORM 0`` for the
    weights and biases of normalisation layers, ``weight_decay`` for everything else, biases
    included (``WEIGHT_DECAY_BIAS`` defaults to ``WEIGHT_DECAY``). Frozen parameters are left
    out; a parameter shared by two modules is listed once."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        target = no_decay if isinstance(module, NORM_TYPES) else decay
        for param in module.parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                target.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
