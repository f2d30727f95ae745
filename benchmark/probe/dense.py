"""The dense probe: gland / background from frozen stage features through a 1 x 1 conv.

The frozen trunk's ``layers`` (layer3 and layer4 by default) are upsampled to the finest of
them and concatenated; a linear head (1 x 1 conv, two classes) is trained on the training
images for a fixed budget with AdamW and a cosine schedule, and scored on each test image at
its own resolution. Features are standardised per channel with training statistics, for
the reason the linear probe standardises: random-init features have arbitrary scales.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.probe.features import stage_maps
from benchmark.transfer.model import PIXEL_MEAN, PIXEL_STD, shortest_edge_size


def overlap_scores(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of the foreground (boolean masks), in percent. An image with no gland in
    either mask scores 100: there was nothing to find and nothing was found."""
    p, t = prediction.astype(bool), truth.astype(bool)
    inter = float(np.logical_and(p, t).sum())
    total = float(p.sum() + t.sum())
    union = float(np.logical_or(p, t).sum())
    if total == 0:
        return 100.0, 100.0
    return 100.0 * 2.0 * inter / total, 100.0 * inter / union


def gland_mask(target: dict) -> Tensor:
    """The union of an image's instance masks (H, W) as a long 0/1 map."""
    masks = target["masks"]
    return (
        masks.amax(dim=0).long() if len(masks) else torch.zeros(masks.shape[1:], dtype=torch.long)
    )


class DenseFeatures:
    """Frozen ``layers`` of ``trunk`` at the finest layer's stride for an image in [0, 1]."""

    def __init__(
        self, trunk: nn.Module, layers: Sequence[str], size: int, max_size: int, device
    ) -> None:
        self.trunk, self.layers = trunk, list(layers)
        self.size, self.max_size, self.device = size, max_size, device
        self.mean = torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1)
        self.std = torch.tensor(PIXEL_STD, device=device).view(3, 1, 1)

    @torch.inference_mode()
    def __call__(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        nh, nw = shortest_edge_size(h, w, self.size, self.max_size)
        x = image.to(self.device).unsqueeze(0)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        maps = stage_maps(self.trunk, (x[0] - self.mean).div(self.std).unsqueeze(0), self.layers)
        finest = max(maps.values(), key=lambda m: m.shape[-1] * m.shape[-2]).shape[-2:]
        up = [
            F.interpolate(m, size=finest, mode="bilinear", align_corners=False)
            for m in maps.values()
        ]
        return torch.cat(up, dim=1)[0].float()


def _logits(head: nn.Module, feats: Tensor, size: Sequence[int]) -> Tensor:
    """Head outputs (B, 2, H, W) at the masks' resolution. The head is linear, so this is the
    head applied to upsampled features, at a fraction of the cost."""
    return F.interpolate(head(feats), size=tuple(size), mode="bilinear", align_corners=False)


#: Training masks are compared at this multiple of the feature resolution (stride 4 for
#: layer3's stride 16): the loss at full resolution costs 16 times more for the same head.
TRAIN_UPSAMPLE = 4


def _training_pairs(pairs: Sequence[tuple[Tensor, Tensor]], mean: Tensor, std: Tensor):
    """Standardised features and their masks, nearest-resized to ``TRAIN_UPSAMPLE`` times
    the feature size (never above the mask's own size)."""
    out = []
    for feats, mask in pairs:
        h, w = feats.shape[-2:]
        size = (min(h * TRAIN_UPSAMPLE, mask.shape[0]), min(w * TRAIN_UPSAMPLE, mask.shape[1]))
        small = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
        out.append(((feats - mean) / std, small.long()))
    return out


def train_dense_head(
    train: Sequence[tuple[Tensor, Tensor]],
    seed: int,
    iterations: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
) -> tuple[nn.Module, Tensor, Tensor]:
    """A 1 x 1 conv head on ``train`` pairs of (features C x h x w, mask H x W); returns the
    head and the per-channel mean and std it expects.

    Each step draws ``batch_size`` images (with replacement, from a generator seeded by
    ``seed``) and averages the per-pixel cross-entropy over each image's own mask, so large
    and small images weigh the same; images of one size go through the head together. The
    loss is taken at ``TRAIN_UPSAMPLE`` x the feature resolution; scoring is at full size.
    """
    flat = torch.cat([f.flatten(1) for f, _ in train], dim=1)
    mean = flat.mean(dim=1).view(-1, 1, 1)
    std = flat.std(dim=1).clamp_min(1e-6).view(-1, 1, 1)
    del flat
    data = _training_pairs(train, mean, std)
    device = mean.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Conv2d(mean.shape[0], 2, kernel_size=1).to(device)
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / iterations))
    )
    for _ in range(iterations):
        picks = torch.randint(len(data), (min(batch_size, len(data)),), generator=order).tolist()
        groups: dict[tuple, list[int]] = {}
        for i in picks:
            groups.setdefault((*data[i][0].shape, *data[i][1].shape), []).append(i)
        losses = []
        for members in groups.values():
            feats = torch.stack([data[i][0] for i in members])
            masks = torch.stack([data[i][1] for i in members]).to(device)
            ce = F.cross_entropy(_logits(head, feats, masks.shape[-2:]), masks, reduction="none")
            losses.append(ce.flatten(1).mean(dim=1))
        loss = torch.cat(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval(), mean, std


@torch.inference_mode()
def score_dense_head(
    head: nn.Module, mean: Tensor, std: Tensor, test: Iterable[tuple[Tensor, Tensor]]
) -> tuple[list[float], list[float]]:
    """Per-image Dice and IoU (percent) of the gland class at each mask's own resolution."""
    dice, iou = [], []
    for feats, mask in test:
        logits = _logits(head, ((feats - mean) / std).unsqueeze(0), mask.shape)
        pred = logits[0].argmax(dim=0).cpu().numpy()
        d, j = overlap_scores(pred, mask.numpy())
        dice.append(d)
        iou.append(j)
    return dice, iou
