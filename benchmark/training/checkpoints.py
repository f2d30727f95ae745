"""Atomic checkpoints, the run folder of one (method, config hash), and the one checkpoint
manager both training stages save and resume through."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmark.core.errors import UserError

#: ``<unit>_<n:07d>.pth``: ``epoch_0000002.pth`` (pre-training), ``iter_0000100.pth``
#: (fine-tuning); the number is the count of units done.
_NAME = "{unit}_{n:07d}.pth"
#: Names written before the manager (``epoch_0002.pth``, ``model_0000100.pth``): still resumed.
_LEGACY_UNITS = {"epoch": ("epoch",), "iter": ("model",)}


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}); move it aside to resume "
            "from the previous one"
        ) from None


class CheckpointManager:
    """Checkpoints of one run folder, numbered by units done (epochs or iterations).

    Only rank 0 writes (``writer=False`` elsewhere); every rank can find and load the newest,
    so all processes resume from the same state.
    """

    def __init__(self, directory: Path, unit: str, writer: bool = True) -> None:
        if unit not in _LEGACY_UNITS:
            raise ValueError(f"unknown checkpoint unit {unit!r}; use one of {list(_LEGACY_UNITS)}")
        self.directory, self.unit, self.writer = Path(directory), unit, writer
        prefixes = "|".join((unit, *_LEGACY_UNITS[unit]))
        self._pattern = re.compile(rf"(?:{prefixes})_(\d+)\.pth$")

    def path(self, n: int) -> Path:
        return self.directory / _NAME.format(unit=self.unit, n=n)

    def found(self) -> list[tuple[int, Path]]:
        """Every checkpoint in the folder (today's names and earlier ones), oldest first."""
        if not self.directory.is_dir():
            return []
        hits = []
        for p in self.directory.iterdir():
            m = self._pattern.match(p.name)
            if m is not None:
                hits.append((int(m.group(1)), p))
        return sorted(hits)

    def latest(self) -> Path | None:
        found = self.found()
        return found[-1][1] if found else None

    def save(self, state: dict[str, Any], n: int) -> Path | None:
        """Write ``state`` as checkpoint ``n`` (atomically; rank 0 only)."""
        if not self.writer:
            return None
        path = self.path(n)
        save_torch(state, path)
        return path
