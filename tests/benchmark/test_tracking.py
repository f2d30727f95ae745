from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.tracking import DEFAULT_TRACKING_URI, PARENT_RUN_ID_TAG, Tracker, tracking_uri


def test_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()  # sqlite needs the folder to exist
    assert tracking_uri("sqlite:///other.db") == "sqlite:///other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri("sqlite:///other.db") == "http://127.0.0.1:5000"


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker("unit", f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "artifacts"))


def test_parent_is_found_not_duplicated(tracker: Tracker):
    a = tracker.parent_run("mocov2", "abc123", {"epochs": "2"})
    b = tracker.parent_run("mocov2", "abc123", {"epochs": "2"})
    c = tracker.parent_run("mocov2", "def456", {"epochs": "2"})
    d = tracker.parent_run("concl", "abc123", {"epochs": "2"})
    assert a == b
    assert len({a, c, d}) == 3
    tags = tracker.client.get_run(a).data.tags
    assert (tags["method"], tags["config_hash"], tags["epochs"], tags["run_kind"]) == (
        "mocov2",
        "abc123",
        "2",
        "benchmark",
    )


def test_child_runs_hang_under_their_parent(tracker: Tracker):
    parent = tracker.parent_run("mocov2", "abc123", {})
    child, created = tracker.child_run(parent, "pretrain", {})
    again, created_again = tracker.child_run(parent, "pretrain", {})
    seed1, _ = tracker.child_run(parent, "finetune", {"dataset": "glas", "seed": 1})
    seed2, _ = tracker.child_run(parent, "finetune", {"dataset": "glas", "seed": 2})
    assert (created, created_again, child) == (True, False, again)
    assert len({child, seed1, seed2}) == 3
    run = tracker.client.get_run(seed2)
    assert run.data.tags[PARENT_RUN_ID_TAG] == parent
    assert (run.data.tags["stage"], run.data.tags["dataset"], run.data.tags["seed"]) == (
        "finetune",
        "glas",
        "2",
    )


def test_metrics_params_and_status(tracker: Tracker, tmp_path: Path):
    parent = tracker.parent_run("mocov2", "abc", {})
    child, _ = tracker.child_run(parent, "pretrain", {})
    tracker.log_params(child, {f"p{i}": i for i in range(150)})  # more than one batch of 100
    tracker.log_metrics(child, {"loss": 2.5, "lr": 0.1}, step=1)
    tracker.log_metrics(child, {"loss": 2.0, "lr": 0.05}, step=2)
    assert tracker.metric_history(child, "loss") == [(1, 2.5), (2, 2.0)]
    assert len(tracker.client.get_run(child).data.params) == 150
    tracker.finish(child)
    assert tracker.status(child) == "FINISHED"
    tracker.set_running(child)
    assert tracker.status(child) == "RUNNING"
    f = tmp_path / "note.txt"
    f.write_text("hello")
    tracker.log_artifact(child, f)
    assert [a.path for a in tracker.client.list_artifacts(child)] == ["note.txt"]


def test_default_artifacts_follow_a_sqlite_store_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from benchmark.tracking import DEFAULT_ARTIFACT_ROOT, artifact_root_for

    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert artifact_root_for(uri, DEFAULT_ARTIFACT_ROOT) == str(tmp_path / "store" / "artifacts")
    assert artifact_root_for(uri, "/elsewhere") == "/elsewhere"  # configured on purpose
    assert artifact_root_for("http://127.0.0.1:5000", DEFAULT_ARTIFACT_ROOT) == "mlruns/artifacts"
    tracker = Tracker("concl-bench", uri, DEFAULT_ARTIFACT_ROOT)
    location = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert location == (tmp_path / "store" / "artifacts").as_uri()
