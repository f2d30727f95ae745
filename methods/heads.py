"""Projection heads (OpenSelfSup "necks") of MoCo-style methods."""

from __future__ import annotations

from torch import nn


def _kaiming_init_linears(module: nn.Module) -> None:
    # OpenSelfSup ``init_linear='kaiming'``: mmcv kaiming_init(mode='fan_in', relu), bias 0.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLPHead(nn.Sequential):
    """MoCo-v2 projector: Linear → ReLU → Linear on pooled features.

    OpenSelfSup's ``NonLinearNeckV1`` without its avg-pool: methods pool first, so the same
    head also projects ConCL's masked-pooled concept prototypes.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )
        _kaiming_init_linears(self)


class LinearHead(nn.Linear):
    """MoCo-v1 projector (OpenSelfSup ``LinearNeck`` without its avg-pool)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim)
        _kaiming_init_linears(self)


class DenseHead(nn.Sequential):
    """DenseCL's dense projector: 1×1 Conv → ReLU → 1×1 Conv on the layer4 grid.

    The per-cell twin of ``MLPHead`` (the ``mlp2`` branch of DenseCL's ``DenseCLNeck`` with
    ``num_grid=None``). Its convolutions keep PyTorch's default init, as in the original,
    whose ``_init_weights`` re-initialises only the neck's Linear and norm layers.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Conv2d(in_dim, hidden_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, 1),
        )
