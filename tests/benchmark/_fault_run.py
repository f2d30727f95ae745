"""``python -m benchmark``, killed with SIGKILL by itself at one named point.

Test-only (tests/benchmark/test_faults.py): a kill -9 from outside lands wherever the process
happens to be (a checkpoint write takes milliseconds), so this wrapper patches the point in
and the fault tests stay deterministic; production code carries no hook. Usage, from the
repository root::

    python -m tests.benchmark._fault_run POINT MARK <arguments of python -m benchmark>

POINT is one of

- ``write:<path suffix>``: inside ``atomic_write`` of the file whose path ends with the
  suffix, after its temporary file is written and before it is renamed into place;
- ``wrote:<path suffix>``: right after that rename;
- ``pretrain_step:<n>``: before pre-training step ``n`` (0-based, global) runs;
- ``finetune_iter:<n>``: before fine-tuning iteration ``n`` (0-based) runs.

Just before the kill the point is written to the file MARK, so the test can tell a kill
that landed from a point never reached (the command then exits normally: the test fails).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _die(point: str, mark: Path) -> None:
    mark.write_text(point)
    os.kill(os.getpid(), signal.SIGKILL)


def _matches(path: Any, suffix: str) -> bool:
    posix = Path(path).as_posix()
    return posix == suffix or posix.endswith("/" + suffix)


def install(point: str, mark: Path) -> None:
    """Patch ``point`` into the modules that reach it (looked up at call time)."""
    kind, _, arg = point.partition(":")
    if kind in ("write", "wrote"):
        from benchmark.training import checkpoints

        original = checkpoints.atomic_write

        def atomic_write(path: Path, write: Callable[[str], None]) -> None:
            if not _matches(path, arg):
                return original(path, write)
            if kind == "write":

                def write_then_die(tmp: str) -> None:
                    write(tmp)
                    _die(point, mark)

                return original(path, write_then_die)
            original(path, write)
            _die(point, mark)

        checkpoints.atomic_write = atomic_write
    elif kind == "pretrain_step":
        from benchmark.pretrain import Pretrainer

        forward = Pretrainer._forward

        def _forward(self: Pretrainer, views: Any, step: int) -> Any:
            if step == int(arg):
                _die(point, mark)
            return forward(self, views, step)

        Pretrainer._forward = _forward  # type: ignore[method-assign]
    elif kind == "finetune_iter":
        from benchmark.transfer import finetune

        seed_step = finetune._seed_step

        def _seed_step(seed: int, world: Any, iteration: int) -> None:
            if iteration == int(arg):
                _die(point, mark)
            seed_step(seed, world, iteration)

        finetune._seed_step = _seed_step
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], Path(sys.argv[2]))
    from benchmark.cli import main

    sys.exit(main(sys.argv[3:]))
