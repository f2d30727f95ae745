"""Completion markers of generated and converted data: a set is only ever reused when its
marker says it was finished with the same settings, and never deleted by the suite."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmark.data.pretrain import DatasetError

MARKER_NAME = ".complete"
#: OS errors a user fixes by freeing space or choosing another folder, not by reading a trace.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker's settings, or None when there is no readable marker."""
    try:
        data = json.loads((Path(root) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def refuse_existing(root: Path, wanted: dict[str, Any], incomplete: str = "") -> None:
    """Raise a one-line ``DatasetError`` (a ``ValueError`` and a user error, so the CLI prints
    it as one line) unless ``root`` is an empty folder.

    ``incomplete`` describes what is missing when the marker matches ``wanted`` but the set
    is still unusable (e.g. its list file was removed).
    """
    if not root.is_dir():
        raise DatasetError(
            f"{root} exists and is not a folder: move it away or choose another root"
        )
    if not any(root.iterdir()):
        return
    found = read_marker(root)
    differ = [f"{k}={found.get(k)}" for k in wanted if found and found.get(k) != wanted[k]]
    if found is None:
        what = f"is not a complete synthetic set (no valid {MARKER_NAME}: an interrupted run?)"
    elif differ:
        what = f"holds a synthetic set made with {', '.join(differ)}"
    else:
        what = f"is an incomplete synthetic set{f' ({incomplete})' if incomplete else ''}"
    asked = ", ".join(f"{k}={v}" for k, v in wanted.items())
    raise DatasetError(
        f"{root} {what}, not {asked}: delete it with `rm -rf {shlex.quote(str(root))}` "
        "and run again, or choose another root"
    )


def publish(
    root: Path,
    wanted: dict[str, Any],
    fill: Callable[[Path], None],
    done: Callable[[], bool],
    replace_stale: bool = False,
) -> Path:
    """Build into a hidden sibling folder, write the marker last, rename into place.

    An interrupted run never leaves something that looks finished; ``done()`` tells whether
    a concurrent writer finished the same set first (then ours is discarded). The sibling
    is on the same file system, so the rename is atomic, and ``mkdir`` honours the umask.
    ``replace_stale``: ``root`` holds this code's own earlier, outdated build (the caller
    checked its marker); it is moved aside just before the rename and removed after.
    """
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = root.parent / f".{root.name}.partial-{tag}"
    made: list[Path] = []
    try:
        made = make_parents(root)
        tmp.mkdir()
    except OSError as exc:
        remove_made(made)
        raise write_error(root, exc) from exc
    try:
        fill(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        old = root.parent / f".{root.name}.stale-{tag}"
        if replace_stale:
            os.rename(root, old)
        try:
            os.rename(tmp, root)  # also replaces an empty folder at root
        except OSError:
            if done():
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
        finally:
            if replace_stale:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own partial folder
        remove_made(made)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(root, exc) from exc
        raise
    return root


def make_parents(root: Path) -> list[Path]:
    """Create the missing parents of ``root``; returns those made, outermost first, so that a
    failed write can remove them again (``remove_made``) and leave the tree as it was."""
    missing = []
    parent = Path(root).parent
    while not parent.exists() and parent.parent != parent:
        missing.append(parent)
        parent = parent.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # a concurrent writer made it: not ours to remove
            continue
        made.append(folder)
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders ``make_parents`` made, innermost first, where they are still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            break  # something else was put there meanwhile: keep it and its parents


def write_error(root: Path, exc: OSError) -> DatasetError:
    """One line for a set that cannot be written at ``root``: full disk, read-only or no
    permission, saying what to do (nothing was left behind: the partial folder is removed)."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space or choose another folder"
    else:
        todo = "choose a writable folder"
    where = f" ({exc.filename})" if exc.filename else ""
    return DatasetError(f"cannot write {root}: {reason}{where}: {todo}")
