"""Process-tree helpers of the tests that stop a real tree and check that nothing is left
(read from /proc; the tests using them skip where there is none)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

#: Skips a test that reads processes from /proc where there is none.
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads processes from /proc"
)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process from /proc; ``None`` when gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return None if state in "ZX" else (state, int(ppid))


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[1]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_gone(pids: set[int], seconds: float) -> set[int]:
    """The processes of ``pids`` still alive after waiting up to ``seconds`` for them."""
    deadline = time.monotonic() + seconds
    while (alive := {p for p in pids if proc_stat(p) is not None}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def wait_for_tree(proc: subprocess.Popen, size: int, seconds: float) -> set[int]:
    """The descendants of ``proc`` once there are at least ``size`` (fails after ``seconds``
    or if ``proc`` exits first)."""
    deadline = time.monotonic() + seconds
    while len(found := descendants(proc.pid)) < size:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before its {size} processes started")
        if time.monotonic() > deadline:
            pytest.fail(f"{len(found)} of {size} processes after {seconds:.0f} s")
        time.sleep(0.2)
    return found


def kill_tree(proc: subprocess.Popen, processes: set[int]) -> None:
    """Clean-up after a failed assertion: nothing of the test may outlive it."""
    processes |= descendants(proc.pid)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in processes:
        if proc_stat(pid) is not None:
            os.kill(pid, signal.SIGKILL)
