"""Per-view augmentations of ConCL's NCT pre-training configs, on PIL images.

The ``train_pipeline`` of each method's ``configs/NCT_pretraining/<method>/`` file in
TencentAILabHealthcare/ConCL (OpenSelfSup pipelines), with torchvision v1 transforms.

Each method builds its views from these pieces; a new recipe (MoCo-v1, SimCLR, BYOL) is one
more ``*_view`` function returning a ``transforms.Compose``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PILGaussianBlur:
    """Gaussian blur with σ ~ U(sigma) applied by PIL (radius = σ), as in MoCo-v2/OpenSelfSup.

    PIL's filter is what the original used; torchvision's GaussianBlur needs a kernel size
    and blurs slightly differently for the same σ. σ comes from torch's RNG, which the
    training loaders seed per sample (``benchmark.data.seeding.SeededSamples``).
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def normalize() -> Callable[[Image.Image], Tensor]:
    """PIL → float tensor normalised with ImageNet mean/std (every method's last step)."""
    return transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def moco_v2_view(image_size: int) -> transforms.Compose:
    """One MoCo-v2 / DenseCL view (OpenSelfSup ``moco_v2`` pipeline of ConCL's NCT configs)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            transforms.RandomHorizontalFlip(),
            normalize(),
        ]
    )


def moco_v1_view(image_size: int) -> transforms.Compose:
    """One MoCo-v1 view (OpenSelfSup ``moco_v1`` pipeline of ConCL's NCT MoCo-v1 config).

    Unlike MoCo-v2: grayscale comes before the jitter, the jitter (hue 0.4) is always
    applied, and there is no blur.
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
            normalize(),
        ]
    )


def center_view(image_size: int) -> transforms.Compose:
    """The un-augmented view of an image: resize the short side, centre crop, normalise.

    PCL embeds the training set with it; NCT patches are already square, so at 224 px this
    is only the normalisation.
    """
    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            normalize(),
        ]
    )


def simclr_view(image_size: int) -> transforms.Compose:
    """One SimCLR view (the ``train_pipeline`` of ConCL's NCT SimCLR config).

    Unlike MoCo-v2: the crop scale starts at 0.08, the flip comes second, and the jitter is
    stronger (0.8, 0.8, 0.8, 0.2).
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            normalize(),
        ]
    )


def byol_views(image_size: int) -> list[transforms.Compose]:
    """BYOL's two asymmetric views (``train_pipeline1/2`` of ConCL's NCT BYOL config).

    Both: bicubic crop with scale from 0.08, flip second, jitter (0.4, 0.4, 0.2, 0.1) with
    p 0.8, grayscale 0.2. They differ only in blur (p 1.0 / 0.1) and solarisation (p 0.0 /
    0.2, pixels >= 128 inverted: OpenSelfSup's ``Solarization`` is torchvision's).
    """
    return [
        transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    image_size,
                    scale=(0.08, 1.0),
                    interpolation=transforms.InterpolationMode.BICUBIC,
                ),
                transforms.RandomHorizontalFlip(),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.RandomApply([PILGaussianBlur((0.1, 2.0))], p=blur_p),
                transforms.RandomSolarize(128, p=solarize_p),
                normalize(),
            ]
        )
        for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))
    ]


class MultiView:
    """Per-sample transform returning one tensor per view transform.

    Every call of a transform draws its own random parameters, so ``MultiView([t, t])``
    gives two independent views of the same image, MoCo's query and key.
    """

    def __init__(self, transforms: Sequence[Callable[[Image.Image], Tensor]]) -> None:
        if not transforms:
            raise ValueError("MultiView needs at least one view transform")
        self.transforms = list(transforms)

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([\n  {inner}\n])"
