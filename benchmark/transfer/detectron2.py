"""Weight exchange with detectron2, as ``TencentAILabHealthcare/ConCL``
``benchmarks/detection/convert-pretrain-to-detectron2.py``.

``export_detectron2`` turns ``backbone.pth`` into the ``.pkl`` that ConCL's ``run.sh`` passes as
``MODEL.WEIGHTS``; ``import_detectron2`` reads such a ``.pkl`` (ours, ConCL's, or the ``_pcl``
variant with ``module.encoder_q.`` keys) back into a torchvision ResNet ``state_dict``. Both
write atomically beside the user's file (``_write_target``): a kill leaves the target as it
was, a full disk is one ``DiskFullError`` line, and the next write of the target removes the
temporary file a killed one left.

The pickle stores its arrays through ``numpy.frombuffer``/``array``/``reshape`` instead of
NumPy 2's default ``numpy._core.multiarray._reconstruct``: NumPy older than 1.26.1 (typical of
the torch 1.x environments detectron2 runs in) cannot import ``numpy._core``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from benchmark.training.checkpoints import atomic_write
from benchmark.transfer.weights import ACCEPTED_WEIGHTS, WeightsError, read_torch_state_dict

#: torchvision ResNet keys, the only ones converted (``fc.*`` is matched to be dropped).
_RESNET_KEY = re.compile(
    r"(conv1\.weight|bn1\.\w+|fc\.[\w.]+"
    r"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+))"
)
#: NumPy dtype kinds torch can take (bool, signed, unsigned, float, complex); object, string
#: and structured arrays are not weights.
_NUMERIC_KINDS = "biufc"
_PCL_PREFIX = "module.encoder_q."
_D2_MODEL_PREFIX = "backbone.bottom_up."
AUTHOR = "ConCL-Bench"


def _to_d2_key(key: str) -> str:
    """The renames of ``convert-pretrain-to-detectron2.py``, in its order."""
    if "layer" not in key:
        key = "stem." + key
    for t in range(1, 5):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in range(1, 4):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _from_d2_key(key: str) -> str:
    """Inverse of :func:`_to_d2_key`."""
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for t in range(1, 4):
        key = key.replace(f"conv{t}.norm", f"bn{t}")
    for t in range(1, 5):
        key = key.replace(f"res{t + 1}", f"layer{t}")
    return key.removeprefix("stem.")


def _bad_keys(keys: list[str], what: str) -> WeightsError:
    more = ", ..." if len(keys) > 3 else ""
    return WeightsError(
        f"{len(keys)} {what} key(s) are not torchvision ResNet keys ({', '.join(keys[:3])}{more}); "
        "expected conv1.*, bn1.*, layer1-4.*"
    )


def to_detectron2(state_dict: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """torchvision ResNet ``state_dict`` → detectron2 ResNet names with numpy values (BN running
    statistics and ``num_batches_tracked`` included); ``fc.*`` is dropped."""
    bad = [k for k in state_dict if not _RESNET_KEY.fullmatch(k)]
    if bad:
        raise _bad_keys(bad, "input")
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        out[_to_d2_key(key)] = value.numpy().copy()
    return out


def from_detectron2(model: dict[str, Any]) -> dict[str, Tensor]:
    """detectron2 ResNet weights (numpy or tensors) → torchvision ResNet ``state_dict``.

    Accepts ConCL's ``_pcl`` keys (``module.encoder_q.`` prefix, other keys dropped) and a
    trained d2 model's ``backbone.bottom_up.`` keys (FPN and heads dropped); ``fc``/MLP keys
    that survived the conversion (``stem.fc.*``) are dropped too.
    """
    for prefix in (_PCL_PREFIX, _D2_MODEL_PREFIX):
        if any(k.startswith(prefix) for k in model):
            model = {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in model.items():
        name = _from_d2_key(key)
        if not _RESNET_KEY.fullmatch(name):
            bad.append(key)
        elif not name.startswith("fc."):
            if isinstance(value, np.ndarray):
                if value.dtype.kind not in _NUMERIC_KINDS:
                    raise WeightsError(
                        f"{key} is an array of {value.dtype}, not numbers: not a detectron2 or "
                        f"torchvision state dict of numeric arrays; expected {ACCEPTED_WEIGHTS}"
                    )
                out[name] = torch.from_numpy(np.array(value, copy=True))
            elif isinstance(value, Tensor):
                out[name] = value.detach().cpu().clone()
            else:
                raise WeightsError(
                    f"{key} is a {type(value).__name__}, not an array or tensor: not a "
                    f"detectron2 or torchvision state dict of arrays; expected {ACCEPTED_WEIGHTS}"
                )
    if bad:
        raise _bad_keys(bad, "detectron2")
    if not out:
        raise WeightsError("no ResNet weights found; expected detectron2 keys like stem.conv1.*")
    return out


def check_resnet(state: dict[str, Tensor]) -> None:
    """Raise a one-line WeightsError unless ``state`` (no ``fc``) is a whole torchvision ResNet:
    detectron2's suffix matching would otherwise load a partial trunk with only a log line."""
    blocks = [
        1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{t}.")), default=-1)
        for t in range(1, 5)
    ]
    if min(blocks) == 0:
        raise WeightsError(f"no ResNet stage layer{blocks.index(0) + 1}.*; expected layer1-4.*")
    block = Bottleneck if any(".conv3." in k for k in state) else BasicBlock
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ResNet(block, blocks).state_dict().items()}
    expected = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or wrong:
        keys = (missing + wrong)[:3]
        raise WeightsError(
            f"not a whole ResNet ({block.__name__}, {blocks} blocks): {len(missing)} missing and "
            f"{len(wrong)} wrongly shaped keys ({', '.join(keys)})"
        )


class _Call:
    """Pickles as ``fn(*args)``, storing only ``fn``'s name."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


class _PortablePickler(pickle.Pickler):
    """Arrays as ``reshape(array(frombuffer(bytes, dtype)), shape)``: names that exist in
    NumPy 1.x and 2.x alike."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray:
            return NotImplemented
        flat = _Call(np.frombuffer, obj.tobytes(order="C"), obj.dtype.str)
        return np.reshape, (_Call(np.array, flat), obj.shape)


def export_detectron2(backbone_pth: Path, out_pkl: Path) -> None:
    """Write ``backbone_pth`` (a torchvision ResNet ``state_dict``) as a detectron2 ``.pkl``.

    ``matching_heuristics`` makes d2's checkpointer match keys by suffix, so ``res2.0.conv1``
    lands on ``backbone.bottom_up.res2.0.conv1``; FPN and heads stay randomly initialised.
    """
    out_pkl = Path(out_pkl)
    if out_pkl.suffix != ".pkl":
        raise WeightsError(f"{out_pkl}: detectron2 weights must end in .pkl (d2 reads them so)")
    state = read_torch_state_dict(backbone_pth)
    try:
        check_resnet(state)
        model = to_detectron2(state)
    except WeightsError as exc:
        raise WeightsError(f"{backbone_pth}: {exc}") from None
    obj = {"model": model, "__author__": AUTHOR, "matching_heuristics": True}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            _PortablePickler(fh, protocol=4).dump(obj)  # protocol 4: Python >= 3.4

    _write_target(out_pkl, write)


def _write_target(path: Path, write: Callable[[str], None]) -> None:
    """``atomic_write`` into a folder of the user's, after removing the temporary files a
    killed write of this same target left (``.<name>.XXXXXXXX.tmp``). Only this target's are
    touched: the folder is not ours (``remove_stale_temps`` would clear every writer's), and
    one command writes a given target at a time."""
    stale = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    if path.parent.is_dir():
        for old in path.parent.iterdir():
            if stale.fullmatch(old.name) and old.is_file():
                old.unlink(missing_ok=True)
    atomic_write(path, write)


#: Globals a detectron2 weight pickle may reference (NumPy 1.x/2.x arrays, ours included).
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "frombuffer"),
    ("numpy", "array"),
    ("numpy", "reshape"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class _WeightsUnpickler(pickle.Unpickler):
    """Loads weight dicts of numpy arrays only: a pickle may otherwise run any code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays)")


def read_detectron2(pkl: Path) -> dict[str, Tensor]:
    """The ResNet weights of a detectron2 ``.pkl`` (``{"model": ...}`` or a bare model dict)
    as a torchvision ``state_dict`` without ``fc``; anything else is a one-line WeightsError
    that names the file and the accepted formats."""
    pkl = Path(pkl)
    try:
        with open(pkl, "rb") as fh:
            # latin1 as d2's checkpointer does, for Python-2 era (Caffe2) pickles
            obj = _WeightsUnpickler(fh, encoding="latin1").load()
    except Exception as exc:
        first = str(exc).strip().splitlines()[:1]
        raise WeightsError(
            f"{pkl}: not a readable pickle ({type(exc).__name__}{': ' + first[0] if first else ''})"
            f"; expected {ACCEPTED_WEIGHTS}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise WeightsError(
            f"{pkl}: holds a {type(obj).__name__}, not a detectron2 weight dict; "
            f"expected {ACCEPTED_WEIGHTS}"
        )
    try:
        state = from_detectron2(obj)
        check_resnet(state)
    except WeightsError as exc:
        raise WeightsError(f"{pkl}: {exc}") from None
    return state


def import_detectron2(pkl: Path, out_pth: Path) -> None:
    """Write the ResNet weights of a detectron2 ``.pkl`` (``{"model": ...}`` or a bare model
    dict) as a torchvision ``state_dict`` that :func:`~benchmark.transfer.model.load_backbone`
    reads (which also reads the ``.pkl`` itself)."""
    state = read_detectron2(pkl)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a full disk is then an OSError, not torch's RuntimeError
            torch.save(state, fh)

    _write_target(Path(out_pth), write)
