"""``make ui``: the MLflow UI on this machine, serving the project's tracking store; and the
supervisor every process tree the suite starts runs under (the UI's server, torchrun, tuning
workers), so that a stop signal or a killed parent never leaves one running.

The server binds 127.0.0.1 only (runs can hold paths and configs that are nobody else's
business); reach it from another machine through an SSH tunnel. The command is built here,
not in the Makefile, so that the test starts exactly what users start.

``mlflow server`` would start about nine processes (uvicorn, a job runner and its huey
consumers for GenAI jobs this project never submits) and take ~25 s to answer; the job
runner is switched off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` unless the caller set
it), which leaves uvicorn alone. A SIGTERM to the server alone could leave children behind,
so the command runs it under
a small supervisor (``python -m benchmark.ui server ...``, ``serve``) that starts it in a
session of its own and, on SIGTERM, SIGINT or SIGHUP, when its own parent (``concl-bench
ui``) goes away, or when the server exits, ends that whole session: SIGTERM, then SIGKILL
after ``STOP_TIMEOUT_S``. Nothing keeps holding the port. ``concl-bench ui`` waits for the
supervisor with ``launch``, which passes stop signals on and never kills it (as
``subprocess.call`` does 0.25 s after Ctrl-C, before a stubborn server could be killed).

``supervise`` is the general form: torchrun (whose workers each lead a session of their
own) and the tuning workers run under it in the launching process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
#: How long the server's processes get to stop on SIGTERM before they are killed.
STOP_TIMEOUT_S = 10.0
#: The signals that stop a supervised tree (kill, Ctrl-C, a closed terminal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_POLL_S = 0.5
#: MLflow's switch for its server-side job runner (GenAI evaluation jobs), unused here.
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
_PR_SET_PDEATHSIG = 1


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


#: The runs view of the UI's model-training workflow. MLflow 3.17's UI picks its landing
#: view from its GenAI / Model training switch (remembered per browser, GenAI at first) or
#: from this URL parameter, before the experiment's ``mlflow.experimentKind`` tag.
RUNS_VIEW = "runs?workflowType=machine_learning"


def ui_url(port: int, experiment_id: str | None, host: str = DEFAULT_HOST) -> str:
    """The page ``make ui`` sends users to: the experiment's training runs (the experiment
    list when the store holds none yet)."""
    base = f"http://{host}:{port}/"
    return f"{base}#/experiments/{experiment_id}/{RUNS_VIEW}" if experiment_id else base


def experiment_id(store: str, name: str) -> str | None:
    """The id of experiment ``name`` in ``store``, or None when it is not there (yet)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=store).get_experiment_by_name(name)
    return found.experiment_id if found is not None else None


def port_in_use(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether something already listens on ``host:port`` (a UI started earlier, say)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _descendant_groups(pids: Iterable[int]) -> set[int]:
    """The process groups of every descendant of ``pids`` (read from /proc; empty where
    there is none): torchrun puts each worker in a session of its own, out of reach of a
    signal to torchrun's group."""
    tree: dict[int, list[tuple[int, int]]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[2])))
    groups: set[int] = set()
    frontier, seen = list(pids), set(pids)
    while frontier:
        for child, pgid in tree.get(frontier.pop(), []):
            if child not in seen:
                seen.add(child)
                groups.add(pgid)
                frontier.append(child)
    return groups


def _die_with_parent(signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``signum`` to the child when this process
    dies (``kill -9`` included; Linux only, and only from the main thread, as the kernel
    ties it to the thread that forks)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        # A shell starts background jobs (`cmd &`) with SIGINT ignored, and children inherit
        # that: the stop signal must reach them whatever the supervisor was started with.
        signal.signal(signum, signal.SIG_DFL)
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # died before the line above: nobody is left to stop us
            os._exit(128 + signum)

    return arm


def _install(handler: Callable[[int, FrameType | None], None]) -> dict[int, Any]:
    """``handler`` for the stop signals not ignored (``nohup`` keeps SIGHUP ignored: a
    closed terminal must not stop a run started so); none off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, handler)
    return previous


@dataclass(frozen=True)
class Supervised:
    """How a supervised tree ended: each command's exit status (negative: killed by that
    signal), and the stop signal that ended it (``None`` when the commands exited)."""

    codes: list[int]
    stopped_by: int | None = None


def end_tree(
    procs: Sequence[subprocess.Popen],
    signum: int | None = signal.SIGTERM,
    timeout: float = STOP_TIMEOUT_S,
) -> None:
    """End every process of ``procs``' sessions (each leads its own) and of the sessions
    their descendants lead: ``signum`` to the leaders' groups (``None``: already sent),
    then SIGKILL to every group left after ``timeout`` seconds; reaps ``procs``."""
    leaders = {p.pid for p in procs}
    groups = leaders | _descendant_groups(p.pid for p in procs if p.poll() is None)
    if signum is not None:
        for pgid in leaders:
            _signal_group(pgid, signum)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            p.poll()  # reap the leaders, or their groups never empty
        if not any(_group_alive(g) for g in groups):
            break
        time.sleep(0.1)
    else:
        groups |= _descendant_groups(p.pid for p in procs if p.poll() is None)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
    for p in procs:
        p.wait()


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """``end_tree`` of one process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    end_tree([proc], signal.SIGTERM, timeout)


def supervise(
    commands: Sequence[Sequence[str]],
    envs: Sequence[Mapping[str, str] | None] | None = None,
    *,
    interrupt: int = signal.SIGTERM,
    timeout: float = STOP_TIMEOUT_S,
    watch_parent: bool = False,
    any_exit_ends: bool = False,
) -> Supervised:
    """Run ``commands``, each in a session of its own, until they exit; a stop signal
    (SIGTERM, SIGINT, SIGHUP), or with ``watch_parent`` the end of this process's parent,
    sends ``interrupt`` to each at once (SIGINT lets the suite's own processes end their
    runs as a Ctrl-C does). Then ``end_tree``: whatever is left after ``timeout`` seconds,
    descendants' sessions included, is killed. The kernel sends ``interrupt`` to each
    command if this process is killed outright. ``any_exit_ends``: the first command that
    exits ends the others (a server whose workers must not outlive it)."""
    envs = list(envs) if envs is not None else [None] * len(commands)
    parent = os.getppid()
    stopped: list[int] = []
    procs: list[subprocess.Popen] = []
    signalled: set[int] = set()

    def interrupt_all() -> None:
        for p in procs:
            if p.pid not in signalled:
                signalled.add(p.pid)
                _signal_group(p.pid, interrupt)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stopped:  # at once: a launcher may not wait for the clean-up below
            interrupt_all()
        stopped.append(signum)

    previous = _install(on_signal)
    try:
        for cmd, env in zip(commands, envs, strict=True):
            if stopped:
                break
            procs.append(
                subprocess.Popen(
                    list(cmd),
                    env=None if env is None else dict(env),
                    start_new_session=True,
                    preexec_fn=_die_with_parent(interrupt),
                )
            )
        while not stopped:
            done = [p.poll() is not None for p in procs]
            if all(done) or (any_exit_ends and any(done)):
                break
            if watch_parent and os.getppid() != parent:  # nobody else would stop us
                stopped.append(signal.SIGTERM)
                break
            time.sleep(_POLL_S)
    finally:
        for s in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        try:
            interrupt_all()  # what is left of a tree that exited, or all of one stopped
            end_tree(procs, None, timeout)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return Supervised([p.returncode for p in procs], stopped[0] if stopped else None)


def serve(cmd: Sequence[str], timeout: float = STOP_TIMEOUT_S) -> int:
    """Run ``cmd`` in a session of its own until it exits, a stop signal arrives or this
    process's parent goes away; then end its whole session. Returns its exit status (128 +
    the signal's number when stopped by one)."""
    result = supervise([cmd], timeout=timeout, watch_parent=True, any_exit_ends=True)
    if result.stopped_by is not None:
        return 128 + result.stopped_by
    return result.codes[0]


def launch(cmd: Sequence[str]) -> int:
    """Run ``cmd`` (a supervisor: ``serve``) in this process group and wait for it, passing
    on the stop signals this process gets; returns its exit status. Unlike
    ``subprocess.call`` it never kills ``cmd``, which needs its time to end a stubborn
    tree."""
    proc = subprocess.Popen(list(cmd))

    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = _install(forward)
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmark.ui server <mlflow server options>``: ``mlflow server`` under
    ``serve``."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault(JOB_EXECUTION_ENV, "false")  # the children inherit it
    return serve([sys.executable, "-m", "mlflow", *args])


if __name__ == "__main__":
    sys.exit(main())
