"""COCO AP for boxes and masks, with pycocotools as the reference (detectron2's
``COCOEvaluator``): AP@[.5:.95], AP50 and AP75 in percent, as in the paper's table."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from benchmark.core.schema import COCO_METRICS

#: The metric names logged per run, in table order.
METRICS = COCO_METRICS


def to_coco_results(
    image_id: int, output: dict[str, Tensor], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's detections as COCO result records (XYWH boxes, RLE masks).

    torchvision returns soft masks pasted into the image; detectron2 binarises them at 0.5.
    """
    boxes = output["boxes"].detach().float().cpu().numpy()
    scores = output["scores"].detach().float().cpu().numpy()
    records = []
    masks = None
    if "masks" in output and len(boxes):
        binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
        masks = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for i, (box, score) in enumerate(zip(boxes, scores, strict=True)):
        x0, y0, x1, y1 = (float(v) for v in box)
        record: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(score),
        }
        if masks is not None:
            rle = masks[i]
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        records.append(record)
    return records


def coco_ap(coco_gt: COCO, results: list[dict[str, Any]]) -> dict[str, float]:
    """``METRICS`` for ``results`` against ``coco_gt``; 0 where there is nothing to score."""
    metrics = dict.fromkeys(METRICS, 0.0)
    for iou_type in ("bbox", "segm"):
        usable = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not usable:
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            coco_dt = coco_gt.loadRes(usable)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(("AP", "AP50", "AP75"), evaluator.stats[:3], strict=True):
            # pycocotools reports -1 where no ground truth exists at all
            metrics[f"{iou_type}_{name}"] = max(float(value), 0.0) * 100.0
    return metrics


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[list[Tensor], list[dict]]], device: torch.device
) -> list[dict[str, Any]]:
    """COCO result records of ``model`` (in eval mode) over ``batches``."""
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for images, targets in batches:
            outputs = model([img.to(device) for img in images])
            for output, target in zip(outputs, targets, strict=True):
                results.extend(to_coco_results(int(target["image_id"]), output))
    finally:
        model.train(was_training)
    return results
