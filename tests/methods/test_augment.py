from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from methods.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiView,
    PILGaussianBlur,
    moco_v1_view,
    moco_v2_view,
    normalize,
)


def _image(h: int = 48, w: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_normalize_uses_imagenet_stats() -> None:
    img = Image.new("RGB", (2, 2), (255, 0, 51))
    out = normalize()(img)
    expected = [
        (v - m) / s for v, m, s in zip((1.0, 0.0, 0.2), IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))


def test_moco_v2_view_shape_dtype_range() -> None:
    torch.manual_seed(0)
    view = moco_v2_view(32)
    lo = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(
        3, 1, 1
    )
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(
        3, 1, 1
    )
    for _ in range(5):
        out = view(_image())
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert torch.all(out >= lo - 1e-5) and torch.all(out <= hi + 1e-5)


def test_multiview_independent_views_and_torch_seeded() -> None:
    view = moco_v2_view(32)
    two = MultiView([view, view])
    torch.manual_seed(0)
    a = two(_image())
    torch.manual_seed(0)
    b = two(_image())
    assert len(a) == 2
    assert not torch.equal(a[0], a[1])  # each call draws its own crop, jitter, blur, flip
    for x, y in zip(a, b, strict=True):  # every random draw (blur σ too) follows torch's seed
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_multiview_pickles_for_dataloader_workers() -> None:
    torch.manual_seed(0)
    two = pickle.loads(pickle.dumps(MultiView([moco_v2_view(16)] * 2)))
    assert [v.shape for v in two(_image())] == [(3, 16, 16), (3, 16, 16)]
    with pytest.raises(ValueError):
        MultiView([])


def test_blur_is_pil_gaussian_with_sigma_as_radius() -> None:
    img = _image()
    out = PILGaussianBlur((1.5, 1.5))(img)
    assert isinstance(out, Image.Image)
    expected = img.filter(ImageFilter.GaussianBlur(radius=1.5))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_blur_sigma_drawn_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    radii: list[float] = []

    class Recorder(ImageFilter.GaussianBlur):
        def __init__(self, radius: float = 2) -> None:
            radii.append(radius)
            super().__init__(radius)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", Recorder)
    torch.manual_seed(0)
    blur = PILGaussianBlur((0.1, 2.0))
    for _ in range(50):
        blur(_image(8, 8))
    assert min(radii) >= 0.1 and max(radii) <= 2.0
    assert max(radii) - min(radii) > 1.0  # drawn fresh each call


def test_moco_v1_view_ops_in_openselfsup_order() -> None:
    ops = moco_v1_view(32).transforms
    crop, gray, jitter, flip, norm = ops
    assert type(crop) is transforms.RandomResizedCrop
    assert (crop.size, crop.scale) == ((32, 32), (0.2, 1.0))
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert type(gray) is transforms.RandomGrayscale and gray.p == 0.2
    # Always applied (no RandomApply), after the grayscale, with hue 0.4; no blur.
    assert type(jitter) is transforms.ColorJitter
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4),) * 3
    assert jitter.hue == (-0.4, 0.4)
    assert type(flip) is transforms.RandomHorizontalFlip and flip.p == 0.5
    assert repr(norm) == repr(normalize())
    torch.manual_seed(0)
    out = moco_v1_view(32)(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
