"""``make ui``: the server it starts serves our runs, nested, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from benchmark.core.schema import DESCRIPTION_TAG, PARENT_RUN_ID_TAG
from benchmark.tracking import Tracker, parent_run_name
from benchmark.ui import port_in_use, server_command


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


def test_ui_server_serves_nested_runs_and_stops(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        experiment = None
        while experiment is None:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {server.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer within 90 s")
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
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert not port_in_use(port)
