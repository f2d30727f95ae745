"""ConCL's view bookkeeping: boxes, the union reference view, and where concepts land."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from methods.augment import IMAGENET_MEAN, IMAGENET_STD
from methods.concepts import match_concepts
from methods.reference_view import ConceptViews, CropBox, relative_box, union_box

SIZE = 224
#: View size: the 14×14 reference map and 7×7 view grids of 224 px views, at half the cost.
VIEW = 112
COLOURS = np.array(
    [
        [230, 30, 30],
        [30, 230, 30],
        [30, 30, 230],
        [230, 230, 30],
        [230, 30, 230],
        [30, 230, 230],
        [120, 120, 120],
        [250, 250, 250],
        [10, 10, 10],
    ]
)


def test_union_box_encloses_both_crops_and_relative_boxes_are_fractions() -> None:
    a = CropBox(top=10, left=40, height=100, width=50, flip=True)
    b = CropBox(top=60, left=20, height=80, width=100)
    u = union_box(a, b)
    assert (u.top, u.left, u.bottom, u.right) == (10, 20, 140, 120)
    assert relative_box(a, u) == pytest.approx([0.0, 0.2, 100 / 130, 0.7, 1.0])
    assert relative_box(b, u) == pytest.approx([50 / 130, 0.0, 1.0, 1.0, 0.0])


def test_reference_view_is_the_clean_union_crop_resized_bicubically(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    crops = iter([(10, 40, 30, 20), (30, 5, 50, 40)])
    monkeypatch.setattr(
        "torchvision.transforms.RandomResizedCrop.get_params", lambda *a, **k: next(crops)
    )
    views = ConceptViews(32)
    q, k, ref, boxes = views(img)
    expected = TF.resized_crop(img, 10, 5, 70, 55, [32, 32], InterpolationMode.BICUBIC)
    assert torch.allclose(ref, views.to_tensor(expected))
    expected_boxes = [[0.0, 35 / 55, 30 / 70, 1.0], [20 / 70, 0.0, 1.0, 40 / 55]]
    assert torch.allclose(boxes[:, :4], torch.tensor(expected_boxes))
    assert set(boxes[:, 4].tolist()) <= {0.0, 1.0}
    assert q.shape == k.shape == ref.shape == (3, 32, 32)


def _region_image(n: int) -> Image.Image:
    ids = np.repeat(np.repeat(np.arange(n * n).reshape(n, n), SIZE // n, 0), SIZE // n, 1)
    return Image.fromarray(COLOURS[ids].astype(np.uint8))


def _region_fractions(view: torch.Tensor, regions: int, cell: int) -> torch.Tensor:
    """(regions, H/cell, W/cell): share of each cell's pixels showing each region's colour."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (view * std + mean) * 255
    colours = torch.tensor(COLOURS[:regions], dtype=torch.float32).view(regions, 3, 1, 1)
    ids = ((pixels.unsqueeze(0) - colours) ** 2).sum(1).argmin(0)
    one_hot = F.one_hot(ids, regions).permute(2, 0, 1).float()
    return F.avg_pool2d(one_hot.unsqueeze(0), cell)[0]


def test_matched_concepts_name_the_same_physical_region_in_both_views() -> None:
    """Property test over many random crops and flips.

    The image is a 3×3 grid of colours (9 known regions). The reference view's 14×14 map is
    labelled with the region each cell shows (a perfect clustering, so only the geometry
    is tested). Cutting it into each view through the recorded boxes and flips must give,
    for each 7×7 view cell, the region that cell's own pixels show. Cells that straddle a
    region border (no region covers 90 % of the cell) have no single physical region and
    are left out; with nine regions they are about a third of all cells.
    """
    torch.manual_seed(0)
    regions = 9
    trials = 80
    img = _region_image(3)
    views = ConceptViews(VIEW)
    views.photometric = lambda x: x  # colours must stay recognisable; geometry is unchanged
    agree = total = 0
    for _ in range(trials):
        q, k, ref, boxes = views(img)
        labels = _region_fractions(ref, regions, VIEW // 14).argmax(0)  # (14, 14)
        for v, view in enumerate((q, k)):
            matched = match_concepts(labels[None], boxes[v][None], regions, (7, 7))[0]
            fractions = _region_fractions(view, regions, VIEW // 7)
            pure = fractions.max(0).values >= 0.9
            agree += int((matched == fractions.argmax(0))[pure].sum())
            total += int(pure.sum())
    assert total > trials * 2 * 49 * 0.4
    assert agree / total >= 0.95, f"{agree}/{total} cells name their own region"
