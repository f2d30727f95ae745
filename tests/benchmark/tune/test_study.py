"""A study's lifecycle: a target count that resumes, failures, and the dead-trial sweep."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from benchmark.tune import TuneError
from benchmark.tune.objective import TrialContext
from benchmark.tune.storage import StudyStorage
from benchmark.tune.study import (
    REFERENCE_ATTR,
    fail_dead_trials,
    run_study,
    study_run,
    summarize,
)
from tests.benchmark.tune._helpers import WEIGHT, by_name, fake_evaluate, runs


@pytest.mark.usefixtures("no_plots")
def test_study_reaches_its_target_and_resumes_with_only_the_missing_trials(storage: str):
    numbers: list[int] = []

    def evaluate(ctx: TrialContext) -> None:
        numbers.append(ctx.trial.number)
        fake_evaluate(ctx)

    study = run_study("concl", "demo", trials=3, storage=storage, evaluate=evaluate)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    study = run_study("concl", "demo", trials=5, storage=storage, evaluate=evaluate)
    assert numbers == [0, 1, 2, 3, 4]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 5
    for t in study.trials:  # the value is the mean over the study's k=2 seeds
        assert t.value == pytest.approx(10 * t.params[WEIGHT] + 0.15)
        assert t.intermediate_values == {
            1: pytest.approx(10 * t.params[WEIGHT] + 0.1),
            2: pytest.approx(10 * t.params[WEIGHT] + 0.2),
        }
    run_study("concl", "demo", trials=5, storage=storage, evaluate=evaluate)
    assert numbers == [0, 1, 2, 3, 4]  # already there: nothing ran

    (parent,) = runs("study")
    assert parent.info.run_name == "tune concl-demo"
    assert parent.data.tags["study"] == "concl-demo"
    assert parent.data.tags["storage"] == storage
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] == 5
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    trials = by_name("trial")
    assert sorted(trials) == [f"trial {n}" for n in range(5)]
    for t in study.trials:
        run = trials[f"trial {t.number}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert run.data.metrics["value"] == pytest.approx(t.value)
        assert run.data.params == {k: str(v) for k, v in t.params.items()}


@pytest.mark.usefixtures("no_plots")
def test_same_study_config_samples_the_same_configurations(tmp_path: Path):
    first = run_study(
        "concl", "demo", 2, storage=f"sqlite:///{tmp_path / 'a.db'}", evaluate=fake_evaluate
    )
    second = run_study(
        "concl", "demo", 2, storage=f"sqlite:///{tmp_path / 'b.db'}", evaluate=fake_evaluate
    )
    assert [t.params for t in first.trials] == [t.params for t in second.trials]


@pytest.mark.usefixtures("no_plots")
def test_a_failing_trial_is_marked_failed_and_the_study_goes_on(storage: str):
    def flaky(ctx: TrialContext) -> None:
        if ctx.trial.number == 1:
            raise RuntimeError("boom in trial 1")
        fake_evaluate(ctx)

    study = run_study("concl", "demo", trials=3, storage=storage, evaluate=flaky)
    states = [t.state for t in study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: boom in trial 1"
    failed = by_name("trial")["trial 1"]
    assert failed.info.status == "FAILED" and failed.data.tags["state"] == "FAIL"
    assert "boom in trial 1" in failed.data.tags["error"]
    (parent,) = runs("study")
    assert parent.data.metrics["n_failed"] == 1 and parent.data.metrics["n_complete"] == 3


@pytest.mark.usefixtures("no_plots")
def test_as_many_failures_as_trials_stop_the_study(storage: str):
    def broken(ctx: TrialContext) -> None:
        raise ValueError("data missing")

    with pytest.raises(TuneError, match="2 trials failed.*ValueError: data missing"):
        run_study("concl", "demo", trials=2, storage=storage, evaluate=broken)
    (parent,) = runs("study")
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["n_failed"] == 2


@pytest.mark.usefixtures("no_plots")
def test_a_trial_left_running_by_a_dead_worker_is_failed_and_its_slot_refilled(storage: str):
    run_study("concl", "demo", trials=1, storage=storage, evaluate=fake_evaluate)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    opened = StudyStorage(storage, "rdb").open()
    study = optuna.load_study(study_name="concl-demo", storage=opened)
    orphan = study.ask()  # RUNNING, as a killed worker leaves it
    orphan.set_user_attr("host", socket.gethostname())
    orphan.set_user_attr("pid", int(dead.stdout))
    alive = study.ask()
    alive.set_user_attr("host", socket.gethostname())
    alive.set_user_attr("pid", os.getpid())

    from benchmark.tracking import Tracker

    assert fail_dead_trials(study, opened, Tracker("concl-bench")) == [orphan.number]
    swept = study.trials[orphan.number]
    assert swept.state == TrialState.FAIL
    assert swept.user_attrs["error"] == "its worker process ended without finishing it"
    assert study.trials[alive.number].state == TrialState.RUNNING
    study.tell(alive.number, state=TrialState.FAIL)

    study = run_study("concl", "demo", trials=2, storage=storage, evaluate=fake_evaluate)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.RUNNING) == 0


@pytest.mark.usefixtures("no_plots")
def test_a_summary_whose_counts_change_at_the_same_trial_count_is_logged(storage: str):
    """A trial swept from RUNNING to FAIL leaves len(study.trials) as it was: the counts
    that changed are logged all the same (at the next step; before, the step they were
    logged at was taken and they were dropped), and a summary without change logs none."""
    from benchmark.tracking import Tracker
    from benchmark.tune.definition import TuneConfig
    from benchmark.tune.schema import load_tune_config

    tune: TuneConfig = load_tune_config("concl", "demo")
    store = StudyStorage(storage, "rdb")
    study = optuna.create_study(study_name="counts", storage=store.open())
    tracker = Tracker("concl-bench")
    run_id = study_run(tracker, "counts", store, tune)
    trial = study.ask()
    summarize(study, tracker, run_id, store)
    study.tell(trial.number, state=TrialState.FAIL)
    summarize(study, tracker, run_id, store)
    summarize(study, tracker, run_id, store)
    assert tracker.metric_history(run_id, "n_failed") == [(0, 0.0), (1, 1.0)]
    assert tracker.metric_history(run_id, "n_complete") == [(0, 0.0)]


@pytest.mark.usefixtures("no_plots")
def test_a_new_study_starts_at_the_configs_own_point(storage: str):
    """Trial 0 runs the released ConCL values (experiments/paper/concl.yaml, warm-up 1 epoch
    from the demo overlay), so every study holds the recipe it set out to beat."""
    study = run_study("concl", "demo", trials=2, storage=storage, evaluate=fake_evaluate)
    first = study.trials[0]
    assert first.params == {
        "method.num_concepts": 8,
        "method.concept_temperature": 0.2,
        "method.temperature": 0.2,
        "method.concept_weight": 1.0,
        "method.warmup_epochs": 1,
        "method.cluster_layer": "layer3",
    }
    assert first.user_attrs[REFERENCE_ATTR] is True
    assert REFERENCE_ATTR not in study.trials[1].user_attrs
    resumed = run_study("concl", "demo", trials=3, storage=storage, evaluate=fake_evaluate)
    assert len(resumed.trials) == 3
    assert sum(REFERENCE_ATTR in t.user_attrs for t in resumed.trials) == 1  # once per study
