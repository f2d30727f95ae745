"""``make ui``: the server it starts serves our runs, nested, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmark.core.schema import DESCRIPTION_TAG, PARENT_RUN_ID_TAG
from benchmark.tracking import Tracker, parent_run_name
from benchmark.ui import port_in_use, server_command
from tests.benchmark._procs import descendants as _descendants
from tests.benchmark._procs import kill_tree as _kill
from tests.benchmark._procs import proc_stat as _stat
from tests.benchmark._procs import wait_gone as _wait_gone


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(port: int, endpoint: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{endpoint}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_parent_names_read_like_the_paper_table():
    assert parent_run_name("concl", 400, "paper") == "concl r18 ep400"
    assert parent_run_name("mocov2", 2, "demo") == "mocov2 r18 ep2 demo"
    assert parent_run_name("random", 200, "paper") == "random r18"
    assert parent_run_name("weights-0a1b2c", 200, "demo", external=True) == "weights-0a1b2c demo"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_ui_serves_nested_runs_and_sigterm_stops_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``concl-bench ui`` as users start it; SIGTERM to it ends the server and its nine
    worker processes (before, they kept running and held the port)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker("concl-bench", uri, str(tmp_path / "artifacts"))
    parent = tracker.parent_run(
        "concl",
        "abc123",
        {"epochs": "400", "profile": "paper"},
        run_name="concl r18 ep400",
        created_tags={DESCRIPTION_TAG: "Benchmark of concl"},
    )
    tracker.log_metrics(parent, {"glas_bbox_AP_mean": 56.8}, step=0)
    for seed in (1, 2):
        child, _ = tracker.child_run(parent, "finetune", {"dataset": "glas", "seed": seed})
        tracker.log_metrics(child, {"bbox_AP": 56.0 + seed}, step=100)
        tracker.finish(child)
    tracker.finish(parent)

    port = _free_port()
    cmd = server_command(port, uri=uri, artifact_root=str(tmp_path / "artifacts"))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[5] == uri
    env = dict(os.environ)
    ui = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "ui", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    processes: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        experiment = None
        while experiment is None:
            if ui.poll() is not None:
                pytest.fail(f"concl-bench ui exited: {ui.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the MLflow UI did not answer within 120 s")
            try:
                experiment = _api(port, "experiments/get-by-name?experiment_name=concl-bench")
            except OSError:
                time.sleep(0.5)
        exp_id = experiment["experiment"]["experiment_id"]
        found = _api(
            port,
            "runs/search",
            {"experiment_ids": [exp_id], "filter": "tags.run_kind = 'benchmark'"},
        )["runs"]
        assert len(found) == 1
        info, data = found[0]["info"], found[0]["data"]
        assert info["run_name"] == "concl r18 ep400"
        tags = {t["key"]: t["value"] for t in data["tags"]}
        assert tags[DESCRIPTION_TAG] == "Benchmark of concl"
        assert {m["key"]: m["value"] for m in data["metrics"]} == {"glas_bbox_AP_mean": 56.8}
        nested = _api(
            port,
            "runs/search",
            {
                "experiment_ids": [exp_id],
                "filter": f"tags.`{PARENT_RUN_ID_TAG}` = '{info['run_id']}'",
                "order_by": ["attributes.run_name ASC"],
            },
        )["runs"]
        assert [r["info"]["run_name"] for r in nested] == [
            "finetune glas seed 1",
            "finetune glas seed 2",
        ]
        processes = _descendants(ui.pid)
        assert len(processes) >= 3  # supervisor, mlflow server, uvicorn, job runner, ...
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
        assert _wait_gone(processes, 30) == set()
        assert not port_in_use(port)
    finally:
        _kill(ui, processes)


_GRANDCHILD = (
    "import signal, subprocess, sys, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN) if sys.argv[1] == 'stubborn' else None; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print('up', flush=True); time.sleep(600)"
)


def _launch(mode: str) -> tuple[subprocess.Popen, int]:
    """What ``concl-bench ui`` does (``subprocess.call`` of the supervised command), with a
    server stand-in that starts a child of its own; returns the launcher and supervisor."""
    serve = (
        "import sys; from benchmark.ui import serve; "
        f"sys.exit(serve([sys.executable, '-c', {_GRANDCHILD!r}, {mode!r}], timeout=2.0))"
    )
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.call([sys.executable, '-c', {serve!r}])",
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job
    )
    assert launcher.stdout.readline().strip() == "up"
    deadline = time.monotonic() + 10
    while len(_descendants(launcher.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # supervisor, stand-in, its sleeper (and the stand-in's python)
    (supervisor,) = [p for p in _descendants(launcher.pid) if _stat(p)[1] == launcher.pid]
    return launcher, supervisor


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_ctrl_c_ends_the_whole_server_session():
    """Ctrl-C reaches the launcher and the supervisor; the launcher kills the supervisor a
    quarter second later, so the server's session must have its SIGTERM by then."""
    launcher, _ = _launch("plain")
    processes = _descendants(launcher.pid)
    try:
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=30)
        assert _wait_gone(processes, 15) == set()
    finally:
        _kill(launcher, processes)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_launcher_still_ends_a_stubborn_server():
    """``kill -9`` of ``concl-bench ui``: the supervisor sees its parent go and ends the
    session, killing what ignores SIGTERM after the timeout."""
    launcher, _ = _launch("stubborn")
    processes = _descendants(launcher.pid)
    try:
        launcher.kill()
        launcher.wait(timeout=30)
        assert _wait_gone(processes, 20) == set()
    finally:
        _kill(launcher, processes)
