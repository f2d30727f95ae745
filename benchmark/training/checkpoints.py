"""Atomic checkpoints, the run folder of one (method, config hash), and the one checkpoint
manager both training stages save and resume through."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmark.core.errors import UserError

#: ``<unit>_<n:07d>.pth``: ``epoch_0000002.pth`` (pre-training), ``iter_0000100.pth``
#: (fine-tuning); the number is the count of units done.
_NAME = "{unit}_{n:07d}.pth"
#: Names written before the manager (``epoch_0002.pth``, ``model_0000100.pth``): still resumed.
_LEGACY_UNITS = {"epoch": ("epoch",), "iter": ("model",)}


#: ``atomic_write``'s temporary files: ``.<name>.<8 characters of mkstemp>.tmp``.
_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
#: Errors of a full disk (or a full quota): the user frees space and runs the command again.
_FULL = {errno.ENOSPC, errno.EDQUOT}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


class DiskFullError(UserError):
    """The disk filled up while a file was written; nothing half-written was left behind."""


class OutputRootError(UserError):
    """The run folder cannot be made or written (read-only, no permission, not a folder)."""


def run_dir(output_root: str | Path, method: str, config_hash: str) -> Path:
    return Path(output_root) / f"{method}-{config_hash}"


def make_writable_folder(directory: Path, output_root: str | Path) -> None:
    """Create ``directory`` and check that files can be written into it, before a stage marks
    any run RUNNING or trains for hours; an unwritable ``output_root`` is one line."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        _raise_if_full(exc, directory)
        reason = exc.strerror or type(exc).__name__
        raise OutputRootError(
            f"cannot write into {directory} ({reason}): choose a writable output_root=… "
            f"(it is {output_root})"
        ) from None


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves
    a half-written file under ``path`` (a kill leaves the temporary file, which the next
    ``CheckpointManager`` of the folder removes). A full disk is a ``DiskFullError``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_if_full(exc, path)
        raise
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_full(exc, path)
        raise


def _raise_if_full(exc: BaseException, path: Path) -> None:
    if isinstance(exc, OSError) and exc.errno in _FULL:
        raise DiskFullError(
            f"disk full while writing {path}: free space under {path.parent} (finished "
            "fine-tunes' iter_*.pth checkpoints can be deleted) and run the same command again"
        ) from None


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` left in ``directory`` when a process
    was killed while writing (up to a checkpoint's size each); returns what was removed.

    Only names of ``atomic_write``'s pattern are touched. Call it where one process owns the
    folder (the writer of a run), never while another process may be writing into it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMP.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_torch(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        # through a Python file: a full disk is then an OSError (ENOSPC), not a RuntimeError
        # of torch's writer that does not say why
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_write(path, write)


def save_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    atomic_write(path, write)


def load_checkpoint(path: Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """The checkpoint at ``path``, a dict holding every key of ``required``; anything else
    (unreadable, another kind of file, keys missing) is a ``CheckpointError``."""
    advice = "move it aside to resume from the previous one"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}); {advice}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint; {advice}"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this stage; "
            f"{advice}"
        )
    return state


class CheckpointManager:
    """Checkpoints of one run folder, numbered by units done (epochs or iterations).

    Only rank 0 writes (``writer=False`` elsewhere); every rank can find and load the newest,
    so all processes resume from the same state. The writer removes the temporary files a
    killed write left in the folder (``remove_stale_temps``) before anything resumes.
    """

    def __init__(self, directory: Path, unit: str, writer: bool = True) -> None:
        if unit not in _LEGACY_UNITS:
            raise ValueError(f"unknown checkpoint unit {unit!r}; use one of {list(_LEGACY_UNITS)}")
        self.directory, self.unit, self.writer = Path(directory), unit, writer
        prefixes = "|".join((unit, *_LEGACY_UNITS[unit]))
        self._pattern = re.compile(rf"(?:{prefixes})_(\d+)\.pth$")
        if writer:
            remove_stale_temps(self.directory)

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

    def prune(self, keep: int = 1) -> list[Path]:
        """Delete every checkpoint but the newest ``keep`` (writer only); returns the deleted.

        For a finished stage: its result is written, the newest checkpoint is enough to
        score it again, and the others are dead weight (181 MB each in fine-tuning).
        """
        if not self.writer or keep < 1:
            return []
        old = [p for _, p in self.found()[:-keep]]
        for p in old:
            p.unlink(missing_ok=True)
        return old

    def save(self, state: dict[str, Any], n: int) -> Path | None:
        """Write ``state`` as checkpoint ``n`` (atomically; rank 0 only)."""
        if not self.writer:
            return None
        path = self.path(n)
        save_torch(state, path)
        return path
