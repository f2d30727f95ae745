"""What ``build_report`` writes and logs, and the one clear error on a store without results."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmark.config import ConfigError
from benchmark.report import build_report
from benchmark.tracking import Tracker
from tests.benchmark.report._store import add_benchmark, add_seed


def test_figures_and_tables_are_logged_to_a_report_run(built):
    result = built.result
    names = {p.name for p in result.figures}
    assert names == {
        f"{kind}_{profile}.png"
        for kind in ("ap_vs_epochs", "seeds", "pretrain_loss", "finetune_loss", "probes")
        for profile in ("paper", "demo")
    } - {"pretrain_loss_demo.png", "finetune_loss_demo.png"} | {  # no demo histories logged
        "probes_vs_epochs_paper.png"  # demo probes have one pre-training budget only
    }
    for path in result.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"]({path.name})" in built.md
    client = MlflowClient(built.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["stage"], run.data.tags["run_kind"]) == ("report", "report")
    assert run.info.run_name.startswith("report ")
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert logged == names | {"results.md", "results.csv", "probes.csv"}


def test_empty_store_is_one_clear_error_and_writes_nothing(built, tmp_path: Path, monkeypatch):
    # the module's store (a new sqlite file costs seconds of migrations), other experiments
    monkeypatch.setenv("MLFLOW_TRACKING_URI", built.uri)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="run `make benchmark` first"):
        build_report(built.uri, "never-run", out)
    assert not out.exists()
    assert MlflowClient(built.uri).get_experiment_by_name("never-run") is None  # not created
    # an experiment with only a tuning trial and a running seed holds no result either
    tracker = Tracker("only-trials", built.uri, str(tmp_path / "artifacts"))
    trial = add_benchmark(tracker, "demo", "concl", 2, "trial", {"tune_study": "s"})
    add_seed(tracker, trial, "glas", 1, 30.0, 30.0)
    parent = add_benchmark(tracker, "demo", "concl", 2, "real")
    add_seed(tracker, parent, "glas", 1, 30.0, 30.0, status="RUNNING")
    with pytest.raises(ConfigError, match="no finished benchmark runs in experiment 'only-trials'"):
        build_report(built.uri, "only-trials", out)
    assert not out.exists()
    assert tracker.client.search_runs([tracker.experiment_id], "tags.run_kind = 'report'") == []
