"""Backbone weight files: the error type, the formats accepted, and the torch file reader.

The lowest layer of weight handling, so that both ``benchmark.transfer.detectron2`` (which
exports from and imports to these files) and ``benchmark.transfer.model`` (which reads either
format into a detector) depend on it and not on each other.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.core.errors import UserError

__all__ = ["ACCEPTED_WEIGHTS", "WeightsError", "check_weights_path", "read_torch_state_dict"]

#: The weight files every reader accepts, named in each of their errors.
ACCEPTED_WEIGHTS = (
    "a torchvision ResNet state_dict (conv1.*, bn1.*, layer1-4.*; fc.* ignored) such as "
    "backbone.pth written after pre-training, optionally under a 'state_dict' key, or a "
    "detectron2 .pkl of numeric arrays (ConCL's or `concl-bench export`'s)"
)
_EXPECTED = f"expected {ACCEPTED_WEIGHTS}"


class WeightsError(UserError, ValueError):
    """Backbone weights that do not fit the detector; the message is one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


def _strip_prefix(key: str) -> str:
    while key.startswith(("module.", "backbone.")):
        key = key.split(".", 1)[1]
    return key


def check_weights_path(path: Path) -> None:
    """A one-line WeightsError for a path that does not exist or is a folder."""
    if not path.exists():
        raise WeightsError(f"{path} does not exist: give the path of {ACCEPTED_WEIGHTS}")
    if not path.is_file():
        raise WeightsError(
            f"{path} is a folder, not a weights file: give the path of {ACCEPTED_WEIGHTS}"
        )


def is_plain_pickle(path: Path) -> bool:
    """Whether ``path`` is a bare pickle (detectron2's format) rather than ``torch.save``'s zip
    archive or legacy file (whose first pickle is torch's magic number, a long integer)."""
    with open(path, "rb") as fh:
        head = fh.read(3)
    return len(head) == 3 and head[0] == 0x80 and head[2] != 0x8A  # 0x8A: LONG1, the magic


def read_torch_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ResNet ``state_dict`` in a ``torch.save`` file with ``module.``/``backbone.``
    prefixes stripped and ``fc.*`` dropped; raises a one-line WeightsError for anything else."""
    path = Path(path)
    check_weights_path(path)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: not a readable PyTorch file ({_first_line(exc)}); {_EXPECTED}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state_dict; {_EXPECTED}")
    other = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if other:
        raise WeightsError(
            f"{path}: {len(other)} entries are not tensors ({', '.join(other[:4])}) - a training "
            f"checkpoint rather than weights?; {_EXPECTED}"
        )
    state: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in obj.items():
        name = _strip_prefix(key)
        if name.startswith("fc."):
            continue
        if name in state:
            raise WeightsError(f"{path}: key {name!r} appears twice after prefix stripping")
        state[name] = value
    return state
