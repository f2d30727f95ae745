"""Atomic checkpoints and the run folder of one (method, config hash)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmark.core.errors import UserError

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pth$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


def run_dir(output_root: str | Path, method: str, config_hash: str) -> Path:
    return Path(output_root) / f"{method}-{config_hash}"


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves
    a half-written file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    atomic_write(path, write)


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch_{epoch:04d}.pth"


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest epoch number in ``directory``, if any."""
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}); move it aside to resume "
            "from the previous one"
        ) from None
