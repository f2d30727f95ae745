"""ConCL's views with their geometry: two augmented crops and the union "reference" view.

ConCL clusters one clean view that contains both crops, then cuts the clustering into each
crop. For that every crop must carry where it came from: its box (top, left, height, width
in original pixels) and whether it was flipped (ConCL's ``with_trans_info`` transforms,
``openselfsup/datasets/pipelines/transforms_with_info.py`` of TencentAILabHealthcare/ConCL,
borrowed from kakaobrain/scrl ``augment/transforms.py``). The
reference view is the enclosing box of the two crops, cut from the un-augmented image and
resized bicubically; each view's box is then expressed in fractions of that union box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from methods.augment import PILGaussianBlur, normalize


@dataclass(frozen=True)
class CropBox:
    """A crop in original-image pixels, and whether the crop was then flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width


def union_box(a: CropBox, b: CropBox) -> CropBox:
    """The smallest box enclosing both crops (the original calls it ``int_*``, but it is
    the union, not the intersection)."""
    top, left = min(a.top, b.top), min(a.left, b.left)
    bottom, right = max(a.bottom, b.bottom), max(a.right, b.right)
    return CropBox(top, left, bottom - top, right - left)


def relative_box(view: CropBox, reference: CropBox) -> list[float]:
    """``[top, left, bottom, right, flip]`` of ``view`` in fractions of ``reference``."""
    return [
        (view.top - reference.top) / reference.height,
        (view.left - reference.left) / reference.width,
        (view.bottom - reference.top) / reference.height,
        (view.right - reference.left) / reference.width,
        float(view.flip),
    ]


class ConceptViews:
    """Per-sample transform: ``[view_q, view_k, reference, boxes]``.

    ``boxes`` is a (2, 5) float tensor, one ``relative_box`` row per view. The views follow
    ConCL's NCT pipeline (``configs/NCT_pretraining/concl/r18_bs256_ep200.py``):
    RandomResizedCrop(scale 0.2–1, bilinear), colour jitter
    (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, blur p 0.5, then a recorded horizontal
    flip. Photometric operations do not move pixels, so they leave the boxes unchanged.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.image_size = image_size
        self.scale, self.ratio = scale, ratio
        self.photometric: Callable[[Image.Image], Image.Image] = transforms.Compose(
            [
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            ]
        )
        self.to_tensor = normalize()

    def crop(self, img: Image.Image) -> tuple[Image.Image, CropBox]:
        """One augmented view and its box."""
        top, left, height, width = transforms.RandomResizedCrop.get_params(
            img, list(self.scale), list(self.ratio)
        )
        size = [self.image_size, self.image_size]
        view = TF.resized_crop(img, top, left, height, width, size, InterpolationMode.BILINEAR)
        view = self.photometric(view)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            view = TF.hflip(view)
        return view, CropBox(top, left, height, width, flip)

    def __call__(self, img: Image.Image) -> list[Tensor]:
        (view_q, box_q), (view_k, box_k) = self.crop(img), self.crop(img)
        ref = union_box(box_q, box_k)
        size = [self.image_size, self.image_size]
        reference = TF.resized_crop(
            img, ref.top, ref.left, ref.height, ref.width, size, InterpolationMode.BICUBIC
        )
        boxes = torch.tensor([relative_box(box_q, ref), relative_box(box_k, ref)])
        return [self.to_tensor(view_q), self.to_tensor(view_k), self.to_tensor(reference), boxes]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.image_size}, scale={self.scale}, "
            f"ratio={self.ratio}, photometric={self.photometric})"
        )
