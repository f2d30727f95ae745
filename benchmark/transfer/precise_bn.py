"""Precise BatchNorm statistics before evaluation (detectron2 ``TEST.PRECISE_BN``).

During fine-tuning the running statistics are an exponential average over weights that keep
changing; detectron2's ``PreciseBN`` hook (fvcore ``update_bn_stats``) replaces them, after the
last iteration, with the average over ``TEST.PRECISE_BN.NUM_ITER`` (200) training batches of
the final model. Under DDP with SyncBN each rank feeds its own batches and gets the same
global statistics.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


def _bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


@torch.no_grad()
def precise_bn(model: MaskRCNN, batches: Iterable[Batch], num_batches: int = 200) -> int:
    """Set every BN's running mean/var to the average of its per-batch statistics over the
    first ``num_batches`` of ``batches`` (``(images, targets)`` as fed to training), and return
    how many batches were used (fewer if ``batches`` runs out).

    Each BN is reset and given ``momentum=None``, PyTorch's cumulative average, which weights
    every batch equally as fvcore does; momenta and train/eval flags are restored afterwards.
    The model runs in train mode (random training sizes, batch statistics) but without grad.
    When all BN layers sit in ``model.backbone`` (this protocol: trunk + FPN), only
    ``transform`` + ``backbone`` run; otherwise the whole model runs on ``(images, targets)``.
    """
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    layers = _bn_layers(model)
    if not layers:
        return 0
    backbone_only = len(_bn_layers(model.backbone)) == len(layers)
    device = next(model.parameters()).device
    flags = {m: m.training for m in model.modules()}
    saved = [
        (
            bn.momentum,
            bn.running_mean.clone(),
            bn.running_var.clone(),
            _clone(bn.num_batches_tracked),
        )
        for bn in layers
    ]
    used, done = 0, False
    try:
        model.train()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
        for images, targets in itertools.islice(batches, num_batches):
            images = [img.to(device, non_blocking=True) for img in images]
            if backbone_only:
                image_list, _ = model.transform(images, None)
                model.backbone(image_list.tensors)
            else:
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                model(images, targets)
            used += 1
        done = True
    finally:
        for bn, (momentum, mean, var, tracked) in zip(layers, saved, strict=True):
            bn.momentum = momentum
            if not done or used == 0:  # failed or saw nothing: keep the old statistics
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked + (used if done else 0))
        for module, training in flags.items():
            module.training = training
    return used
