"""``make ui``: the MLflow UI on this machine, serving the project's tracking store.

The server binds 127.0.0.1 only (runs can hold paths and configs that are nobody else's
business); reach it from another machine through an SSH tunnel. The command is built here,
not in the Makefile, so that the test starts exactly what users start.

``mlflow server`` starts about nine processes (uvicorn, a job runner, its huey consumers),
and a SIGTERM to the server alone leaves the consumers behind. So the command runs it under
a small supervisor (``python -m benchmark.ui server ...``, ``serve``) that starts it in a
session of its own and, on SIGTERM, SIGINT or SIGHUP, when its own parent (``concl-bench
ui``) goes away, or when the server exits, ends that whole session: SIGTERM, then SIGKILL
after ``STOP_TIMEOUT_S``. Nothing keeps holding the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
#: How long the server's processes get to stop on SIGTERM before they are killed.
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.5


def server_command(
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    uri: str | None = None,
    artifact_root: str | None = None,
) -> list[str]:
    """``mlflow server`` over the project's store (``MLFLOW_TRACKING_URI`` wins), under the
    supervisor: ``[python, -m, benchmark.ui, server, --backend-store-uri, <store>, ...]``
    (index 5 is the store, as for ``mlflow server`` itself). MLflow is imported here, not
    at the top, so that the supervisor itself starts in a blink and stays small."""
    from benchmark.tracking import DEFAULT_ARTIFACT_ROOT, artifact_root_for, tracking_uri

    artifact_root = artifact_root or DEFAULT_ARTIFACT_ROOT
    store = tracking_uri(uri)
    artifact_root = artifact_root_for(store, artifact_root) or DEFAULT_ARTIFACT_ROOT
    if "://" not in artifact_root:
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "benchmark.ui",
        "server",
        "--backend-store-uri",
        store,
        "--default-artifact-root",
        artifact_root,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def port_in_use(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether something already listens on ``host:port`` (a UI started earlier, say)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """End every process of ``proc``'s session (it leads its own group): SIGTERM, then
    SIGKILL what is left after ``timeout`` seconds; reaps ``proc``."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never empties
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def serve(cmd: Sequence[str], timeout: float = STOP_TIMEOUT_S) -> int:
    """Run ``cmd`` in a session of its own until it exits, a stop signal arrives or this
    process's parent goes away; then end its whole session. Returns its exit status (128 +
    the signal's number when stopped by one)."""
    parent = os.getppid()
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    stopped: list[int] = []
    proc: subprocess.Popen | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)
        if proc is not None:  # at once: Ctrl-C in ``subprocess.call`` kills us in 0.25 s
            _signal_group(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in stops}
    rc = 0
    try:
        proc = subprocess.Popen(list(cmd), start_new_session=True)
        while not stopped and proc.poll() is None:
            if os.getppid() != parent:  # concl-bench ui was killed: nobody else stops us
                stopped.append(signal.SIGTERM)
                break
            time.sleep(_POLL_S)
        rc = 128 + stopped[0] if stopped else proc.returncode
    finally:
        for s in stops:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        if proc is not None:
            stop_group(proc, timeout)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmark.ui server <mlflow server options>``: ``mlflow server`` under
    ``serve``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return serve([sys.executable, "-m", "mlflow", *args])


if __name__ == "__main__":
    sys.exit(main())
