from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmark.lineage import pretrain_input
from benchmark.tracking import (
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_ID_TAG,
    MlflowMetrics,
    Tracker,
    resolve_tracking_uri,
    run_status,
    tracking_uri,
)


def test_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()  # sqlite needs the folder to exist
    assert resolve_tracking_uri("sqlite:///other.db") == "sqlite:///other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("sqlite:///other.db") == "http://127.0.0.1:5000"


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


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the tests below (a fresh one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def shared(module_store: str, monkeypatch: pytest.MonkeyPatch, request) -> Tracker:
    """A tracker on ``module_store`` in an experiment of this test's own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_store)
    return Tracker(request.node.name, module_store)


def _reopened(tracker: Tracker) -> Tracker:
    """A second process on the same store: nothing remembered but what the store holds."""
    return Tracker(tracker.client.get_experiment(tracker.experiment_id).name, tracker.uri)


def _steps(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted(tracker.metric_history(run_id, key))


def test_a_resumed_run_logs_each_step_once(shared: Tracker):
    """Pre-training epochs, fine-tuning windows and final metrics, probe metrics: a run
    reopened (another process) and logged again from its last checkpoint keeps one entry
    per (key, step), the first one."""
    parent = shared.parent_run("mocov2", "abc", {})
    pre, _ = shared.child_run(parent, "pretrain", {})
    ft, _ = shared.child_run(parent, "finetune", {"dataset": "glas", "seed": 1})
    probe, _ = shared.child_run(parent, "probe", {"probe": "knn"})
    epochs = MlflowMetrics(shared, pre, per_epoch=True)
    for epoch, loss in ((1, 5.0), (2, 4.0)):  # epoch 2 logged, then killed before its ckpt
        epochs.on_epoch_end({"loss": loss, "lr": 0.1}, epoch)
    windows = MlflowMetrics(shared, ft, per_epoch=False, prefix="train_", final_step=6)
    for step, loss in ((2, 3.0), (4, 2.5)):  # window 4 logged, checkpoint only at 2
        windows.on_log({"loss": loss}, step)
    shared.log_metrics(probe, {"dice": 40.0}, step=0)

    again = _reopened(shared)
    epochs = MlflowMetrics(again, pre, per_epoch=True)
    for epoch, loss in ((2, 4.5), (3, 3.5)):  # resumed from the epoch-1 checkpoint
        epochs.on_epoch_end({"loss": loss, "lr": 0.1}, epoch)
    windows = MlflowMetrics(again, ft, per_epoch=False, prefix="train_", final_step=6)
    for step, loss in ((4, 2.7), (6, 2.0)):  # resumed from the iteration-2 checkpoint
        windows.on_log({"loss": loss}, step)
    windows.on_done({"bbox_AP": 12.5})
    windows.on_done({"bbox_AP": 12.5})  # a scored seed read back and logged again
    again.log_metrics(probe, {"dice": 41.0, "iou": 30.0}, step=0)

    assert _steps(again, pre, "loss") == [(1, 5.0), (2, 4.0), (3, 3.5)]
    assert _steps(again, pre, "lr") == [(1, 0.1), (2, 0.1), (3, 0.1)]
    assert _steps(again, ft, "train_loss") == [(2, 3.0), (4, 2.5), (6, 2.0)]
    assert _steps(again, ft, "bbox_AP") == [(6, 12.5)]
    assert _steps(again, probe, "dice") == [(0, 40.0)]
    assert _steps(again, probe, "iou") == [(0, 30.0)]  # a new key at an old step is logged


def test_aggregates_are_logged_only_when_they_change(shared: Tracker):
    parent = shared.parent_run("mocov2", "abc", {})
    summary = {"glas_bbox_AP_mean": 50.0, "glas_bbox_AP_std": 2.0, "glas_seeds": 3.0}
    assert shared.log_summary(parent, summary) == summary
    assert shared.log_summary(parent, summary) == {}
    again = _reopened(shared)
    assert again.log_summary(parent, summary) == {}  # a re-run of the finished benchmark
    changed = {**summary, "glas_bbox_AP_mean": 51.0}  # a seed re-scored
    assert again.log_summary(parent, changed) == {"glas_bbox_AP_mean": 51.0}
    assert _steps(again, parent, "glas_bbox_AP_mean") == [(0, 50.0), (1, 51.0)]
    assert _steps(again, parent, "glas_seeds") == [(0, 3.0)]
    assert again.client.get_run(parent).data.metrics["glas_bbox_AP_mean"] == 51.0


def _finished_benchmark(tracker: Tracker) -> tuple[str, str, int]:
    parent = tracker.parent_run("mocov2", "abc", {})
    with run_status(tracker, parent):
        child, _ = tracker.child_run(parent, "finetune", {"seed": 1})
        with run_status(tracker, child):
            pass
    return parent, child, tracker.client.get_run(parent).info.end_time


def test_a_rerun_that_runs_nothing_leaves_finished_runs_alone(shared: Tracker):
    parent, child, ended = _finished_benchmark(shared)
    assert (shared.status(parent), shared.status(child)) == ("FINISHED", "FINISHED")
    again = _reopened(shared)
    found = again.parent_run("mocov2", "abc", {})
    with run_status(again, found):  # every child already done
        assert again.status(found) == "FINISHED"
        assert again.child_run(found, "finetune", {"seed": 1}) == (child, False)
    with pytest.raises(PermissionError), run_status(again, found):  # fails before any work
        raise PermissionError("output_root is not writable")
    run = again.client.get_run(found)
    assert (run.info.status, run.info.end_time, again.status(child)) == (
        "FINISHED",
        ended,
        "FINISHED",
    )


def test_a_parent_runs_when_a_child_starts_and_ends_with_it(shared: Tracker):
    parent, _, ended = _finished_benchmark(shared)
    again = _reopened(shared)
    with pytest.raises(RuntimeError), run_status(again, parent):
        seed2, created = again.child_run(parent, "finetune", {"seed": 2})
        with run_status(again, seed2):
            assert (again.status(seed2), again.status(parent)) == ("RUNNING", "RUNNING")
            raise RuntimeError("diverged")
    assert (again.status(seed2), again.status(parent)) == ("FAILED", "FAILED")
    with run_status(again, parent), run_status(again, seed2):  # run again: it completes
        pass
    run = again.client.get_run(parent)
    assert (run.info.status, again.status(seed2)) == ("FINISHED", "FINISHED")
    assert run.info.end_time >= ended


def test_a_child_made_but_never_run_ends_with_its_parent(shared: Tracker):
    """A failure between opening a child and running it (a folder that cannot be made)."""
    parent = shared.parent_run("mocov2", "abc", {})
    with pytest.raises(OSError), run_status(shared, parent):
        child, created = shared.child_run(parent, "pretrain", {})
        assert created and shared.status(child) == "RUNNING"  # MLflow makes runs RUNNING
        raise OSError("read-only file system")
    assert (shared.status(parent), shared.status(child)) == ("FAILED", "FAILED")


def test_failing_set_up_ends_a_new_run(shared: Tracker):
    parent = shared.parent_run("mocov2", "abc", {})
    with pytest.raises(KeyboardInterrupt), shared.failing(parent):
        raise KeyboardInterrupt
    assert shared.status(parent) == "KILLED"
    again = _reopened(shared)
    found = again.parent_run("mocov2", "abc", {})
    with pytest.raises(ValueError), again.failing(found):  # not started here: left alone
        raise ValueError
    assert again.status(found) == "KILLED"


def test_a_killed_run_completed_by_a_rerun_ends_finished(shared: Tracker):
    """kill -9 leaves a parent RUNNING; a re-run that finds all its work done closes it."""
    parent = shared.parent_run("mocov2", "abc", {})
    again = _reopened(shared)
    with run_status(again, again.parent_run("mocov2", "abc", {})):
        pass
    assert again.status(parent) == "FINISHED"


def test_experiment_opens_on_training_runs(tmp_path: Path):
    """MLflow 3's UI lands on the GenAI overview unless the experiment says it is model
    training; an experiment made by an older version gets the tag on first use."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    made = Tracker("unit", uri, str(tmp_path / "artifacts"))
    tags = made.client.get_experiment(made.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = made.client.create_experiment("old", artifact_location=str(tmp_path / "old"))
    assert EXPERIMENT_KIND_TAG not in made.client.get_experiment(old).tags
    Tracker("old", uri, str(tmp_path / "old"))
    assert made.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_runs_carry_source_tags_and_deduplicated_inputs(tracker: Tracker, tmp_path: Path):
    parent = tracker.parent_run("concl", "h1", {})
    child, _ = tracker.child_run(parent, "finetune", {"dataset": "glas", "seed": 1})
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for run in (parent, child):
        tags = tracker.client.get_run(run).data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.source.name"] == "concl-bench"
    (tmp_path / "a.png").write_bytes(b"x")
    data = [pretrain_input(tmp_path, ["a.png"], "demo", synthetic=True)]
    tracker.log_inputs(child, data)
    tracker.log_inputs(child, data)  # a re-run logs the same set again: kept once
    inputs = tracker.client.get_run(child).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [
        (tmp_path.name, data[0].dataset.digest)
    ]


def test_system_metrics_sampled_when_asked(tracker: Tracker):
    """``tracking.system_metrics=true`` samples onto the run (off by default on the CPU)."""
    from omegaconf import OmegaConf

    from benchmark.system_metrics import system_metrics, wanted

    assert wanted(None, torch.device("cuda")) and not wanted(None, torch.device("cpu"))
    assert wanted(True, torch.device("cpu")) and not wanted(False, torch.device("cuda"))
    run = tracker.parent_run("concl", "sys", {})
    cfg = OmegaConf.create({"tracking": {"system_metrics": True, "system_metrics_interval_s": 0.2}})
    with system_metrics(tracker.uri, run, cfg, torch.device("cpu")):
        time.sleep(1.0)
    keys = tracker.client.get_run(run).data.metrics
    assert "system/cpu_utilization_percentage" in keys
    assert "system/system_memory_usage_megabytes" in keys
    cfg.tracking.system_metrics = None
    quiet = tracker.parent_run("concl", "quiet", {})
    with system_metrics(tracker.uri, quiet, cfg, torch.device("cpu")):
        time.sleep(0.5)
    assert not tracker.client.get_run(quiet).data.metrics
