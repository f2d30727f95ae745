"""AP against values computed by hand and against pycocotools run directly."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmark.transfer.evaluate import METRICS, coco_ap, to_coco_results


def _square(h: int, w: int, y0: int, x0: int, size: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0 : y0 + size, x0 : x0 + size] = 1
    return m


@pytest.fixture
def gt() -> tuple[COCO, list[np.ndarray]]:
    """One 64x64 image with four 10x10 glands."""
    masks = [_square(64, 64, y, x, 10) for y, x in ((2, 2), (2, 40), (40, 2), (40, 40))]
    anns = []
    for i, m in enumerate(masks, start=1):
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append(
            {
                "id": i,
                "image_id": 1,
                "category_id": 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": 64, "width": 64, "file_name": "a.png"}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "gland"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, masks


def _output(masks: list[np.ndarray], scores: list[float]) -> dict[str, torch.Tensor]:
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.ones(len(masks), dtype=torch.int64),
        "masks": torch.tensor(np.stack(masks)[:, None], dtype=torch.float32)
        if masks
        else torch.zeros(0, 1, 64, 64),
    }


def test_perfect_predictions_score_100(gt):
    coco, masks = gt
    results = to_coco_results(1, _output(masks, [0.9, 0.8, 0.7, 0.6]))
    assert results[0]["bbox"] == [2.0, 2.0, 10.0, 10.0]
    metrics = coco_ap(coco, results)
    assert metrics == {name: pytest.approx(100.0) for name in METRICS}


def test_half_the_glands_found_gives_the_101_point_value_by_hand(gt):
    coco, masks = gt
    metrics = coco_ap(coco, to_coco_results(1, _output(masks[:2], [0.9, 0.8])))
    # precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points
    assert metrics["bbox_AP"] == pytest.approx(100 * 51 / 101)
    assert metrics["segm_AP50"] == pytest.approx(100 * 51 / 101)


def test_no_detections_score_zero(gt):
    coco, _ = gt
    assert coco_ap(coco, to_coco_results(1, _output([], []))) == dict.fromkeys(METRICS, 0.0)


def test_equals_pycocotools_run_directly_on_noisy_predictions(gt):
    coco, masks = gt
    rng = np.random.default_rng(0)
    noisy = []
    for m in masks + masks[:2]:
        shifted = np.roll(m, shift=tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
        noisy.append(shifted)
    results = to_coco_results(1, _output(noisy, list(rng.random(len(noisy)))))
    ours = coco_ap(coco, results)
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            e = COCOeval(coco, coco.loadRes(results), iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
        assert ours[f"{iou_type}_AP"] == pytest.approx(100 * e.stats[0])
        assert ours[f"{iou_type}_AP50"] == pytest.approx(100 * e.stats[1])
        assert ours[f"{iou_type}_AP75"] == pytest.approx(100 * e.stats[2])
    assert 0 < ours["bbox_AP"] < 100
