"""The tracking store under faults: every store that cannot work is one ``TrackingError`` line
within seconds, before any run is touched; two processes can start on one fresh store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import benchmark.tracking as tracking
from benchmark.tracking import Tracker, TrackingError, store_lock

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(uri: str, monkeypatch: pytest.MonkeyPatch, seconds: float = 10.0) -> str:
    """The one-line message ``Tracker`` refuses ``uri`` with, checked to come in time."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError) as exc:
        Tracker("faults", uri)
    assert time.monotonic() - start < seconds
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_store_under_a_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    message = _refused(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}", monkeypatch)
    assert message.startswith(f"cannot create the folder {blocker / 'sub'} of the tracking store")
    assert "set MLFLOW_TRACKING_URI (or tracking.uri) to a writable place" in message
    assert blocker.read_text() == "x"


def _uncreatable_folder() -> Path:
    """An existing folder where no file can be made, though ``os.access`` may say yes (root)."""
    folder = Path("/proc")
    probe = folder / "concl-probe.lock"
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError:
        return folder
    probe.unlink()
    pytest.skip("/proc accepts new files here")


def test_a_store_where_no_file_can_be_made_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch):
    """``sqlite:////proc/mlflow.db``: filelock took the lock file it could not create for one
    held by another process, waited 120 s and blamed that process."""
    folder = _uncreatable_folder()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    message = _refused(uri, monkeypatch, seconds=5.0)
    assert message.startswith(
        f"the folder {folder} of the tracking store {uri} is not writable (cannot create the "
        f"lock file {folder / 'mlflow.db.lock'}: "
    )
    assert message.endswith(
        "set MLFLOW_TRACKING_URI (or tracking.uri) to a writable place, e.g. "
        "sqlite:///mlruns/mlflow.db"
    )


def test_the_lock_timeout_tells_an_uncreatable_file_from_a_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Past the checks (a folder that turned unwritable, a lock held by a hung set-up), the
    timeout says which of the two it was."""
    monkeypatch.setattr(tracking, "STORE_LOCK_TIMEOUT_S", 0.3)
    folder = _uncreatable_folder()
    with pytest.raises(TrackingError) as exc, store_lock(f"sqlite:///{folder / 'mlflow.db'}"):
        pass
    assert str(exc.value).startswith(f"cannot create the lock file {folder / 'mlflow.db.lock'} (")
    db = tmp_path / "mlflow.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            "lock = FileLock(sys.argv[1]); lock.acquire(); print(flush=True); time.sleep(60)",
            f"{db}.lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "\n"  # it holds
        with pytest.raises(TrackingError) as exc, store_lock(f"sqlite:///{db}"):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert str(exc.value).startswith(f"{db}.lock is held by another process, which has been")
    assert str(exc.value).endswith("wait for it to finish (or end it) and run again")


def test_a_file_that_is_not_a_database_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "mlflow.db"
    db.write_text("these are my notes")
    message = _refused(f"sqlite:///{db}", monkeypatch)
    assert message.startswith(f"the tracking store {db} is not an SQLite database")
    assert db.read_text() == "these are my notes"


def test_an_unknown_scheme_is_one_line(monkeypatch: pytest.MonkeyPatch):
    message = _refused("foo://somewhere/db", monkeypatch)
    assert message.startswith("MLflow cannot use the tracking store 'foo://somewhere/db'")
    assert message.endswith("to a sqlite:///path/mlflow.db file or an http://host:port server")


def test_an_unreachable_server_fails_in_seconds(monkeypatch: pytest.MonkeyPatch):
    port = _free_port()  # nobody listens there: MLflow's own client would retry for minutes
    message = _refused(f"http://127.0.0.1:{port}", monkeypatch, seconds=8.0)
    assert message.startswith(f"cannot reach the MLflow server at http://127.0.0.1:{port} (")
    assert "start it (`make ui` serves the local store) or unset MLFLOW_TRACKING_URI" in message


def test_the_cli_prints_one_line_and_exits_2(tmp_path: Path):
    """What a user sees: ``concl-bench report`` against a server that is not there."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark", "report", "--out", str(tmp_path / "r")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the MLflow server at")
    assert time.monotonic() - start < 60  # the import of MLflow, not minutes of retries
    assert not (tmp_path / "r").exists()


def test_a_deleted_experiment_says_how_to_restore_it(monkeypatch: pytest.MonkeyPatch):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    tracker = Tracker("faults", uri)
    tracker.client.delete_experiment(tracker.experiment_id)
    message = _refused(uri, monkeypatch)
    assert message.startswith("the MLflow experiment 'faults' in ")
    assert f"mlflow experiments restore --experiment-id {tracker.experiment_id}" in message


# --- read-only places and a full disk: real ones, made in a private mount namespace as root
#     (a bind mount remounted read-only, a 64 KiB tmpfs), or with chmod for other users


def _mount_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def _run_python(code: str, setup: str = "", env: dict[str, str] | None = None) -> dict:
    """``code`` in a fresh interpreter after the shell commands ``setup`` (in a private mount
    namespace when root); it prints one JSON object, returned here."""
    shell = f'{setup} exec {sys.executable} -c "$1"'
    cmd = ["sh", "-c", shell, "sh", textwrap.dedent(code)]
    if os.geteuid() == 0:
        cmd = ["unshare", "--mount", "--propagation", "private", *cmd]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_OPEN_STORE = """
    import json, os, time
    from benchmark.tracking import Tracker, TrackingError
    start = time.monotonic()
    try:
        Tracker("faults", os.environ["MLFLOW_TRACKING_URI"])
        error = None
    except TrackingError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "seconds": time.monotonic() - start}))
"""


@pytest.mark.skipif(
    os.geteuid() == 0 and not _mount_namespaces(), reason="root without mount namespaces"
)
def test_a_read_only_store_fails_fast_and_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The case that took MLflow about 100 s of engine retries before a raw traceback."""
    folder = tmp_path / "store"
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker("faults", uri)
    run = tracker.parent_run("mocov2", "abc", {})
    tracker.finish(run)
    before = _sha(folder / "mlflow.db")
    if os.geteuid() == 0:
        setup = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} &&"
    else:
        setup = f"chmod a-w {folder} &&"
    try:
        result = _run_python(_OPEN_STORE, setup, env)
    finally:
        folder.chmod(0o755)
    assert result["error"] == (
        f"the folder {folder} of the tracking store {uri} is read-only (sqlite writes its "
        "journal beside the database); make it writable or set MLFLOW_TRACKING_URI (or "
        "tracking.uri) elsewhere"
    )
    assert result["seconds"] < 10
    assert _sha(folder / "mlflow.db") == before
    assert tracker.status(run) == "FINISHED"


@pytest.mark.skipif(not _mount_namespaces(), reason="needs root and mount namespaces (tmpfs)")
def test_a_full_disk_while_logging_an_artifact_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    store = tmp_path / "store" / "mlflow.db"
    code = f"""
        import json
        from pathlib import Path
        from benchmark.tracking import Tracker, TrackingError
        tracker = Tracker("faults", "sqlite:///{store}", "{artifacts}")
        run = tracker.parent_run("mocov2", "abc", {{}})
        tracker.log_metrics(run, {{"loss": 1.5}}, step=1)
        big = Path("{tmp_path}") / "backbone.pth"
        big.write_bytes(bytes(200_000))  # more than the 64 KiB the artifact disk has
        try:
            tracker.log_artifact(run, big)
            error = None
        except TrackingError as exc:
            error = str(exc)
        print(json.dumps({{"error": error, "run": run}}))
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    result = _run_python(code, f"mount -t tmpfs -o size=64k tmpfs {artifacts} &&", env)
    assert result["error"] is not None and "\n" not in result["error"]
    assert result["error"].startswith("disk full while writing artifact backbone.pth to file://")
    assert result["error"].endswith(
        "free space there and run the same command again (finished work is kept)"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    tracker = Tracker("faults", f"sqlite:///{store}")  # what was logged before is there
    assert tracker.metric_history(result["run"], "loss") == [(1, 1.5)]


# --- two processes on one fresh store

_START = """
    import json, os, sys, time
    from pathlib import Path
    from benchmark.tracking import Tracker
    base, ready, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ready.touch()  # imported
    for k in range(rounds):
        while not (base / f"go{k}").exists():
            time.sleep(0.005)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / f'fresh{k}' / 'mlflow.db'}"
        tracker = Tracker("concl-bench", os.environ["MLFLOW_TRACKING_URI"])
        parent = tracker.parent_run("mocov2", "abc", {})
        child, _ = tracker.child_run(parent, "pretrain", {})
        print(json.dumps({"parent": parent, "child": child}), flush=True)
"""


def test_two_processes_start_on_one_fresh_store_three_times(tmp_path: Path):
    """Both would run MLflow's schema set-up; without the store's lock one died with
    ``sqlite3.OperationalError: duplicate column name`` (3 of 3 tries). Three rounds, each
    on a fresh store, both processes released at once."""
    rounds = 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_START), str(tmp_path), str(r), str(rounds)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        for k in range(rounds):
            deadline = time.monotonic() + 120
            while not all(r.exists() for r in ready):
                assert all(p.poll() is None for p in procs), "a process died before the start"
                assert time.monotonic() < deadline
                time.sleep(0.05)
            (tmp_path / f"go{k}").touch()  # both at once
            lines = [json.loads(p.stdout.readline() or "null") for p in procs]
            assert None not in lines, [p.stderr.read()[-3000:] for p in procs if p.poll()]
            assert lines[0] == lines[1]  # one experiment, one parent, one child between them
            assert (tmp_path / f"fresh{k}" / "mlflow.db.lock").exists()
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
