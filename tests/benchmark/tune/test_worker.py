"""Worker processes: a shared journal, distinct trials, no overshoot of TRIALS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from benchmark.tune.objective import TrialContext
from benchmark.tune.storage import StudyStorage
from benchmark.tune.study import run_study
from benchmark.tune.worker import WORKER_ENTRY
from tests.benchmark._procs import kill_tree, needs_proc, wait_for_tree, wait_gone
from tests.benchmark.tune._helpers import by_name, fake_evaluate, runs

REPO = Path(__file__).resolve().parents[3]


def parallel_evaluate(ctx: TrialContext) -> None:
    """Trial 0 waits until trial 1 exists: its worker is busy, so the other worker made it
    while trial 0 was running (the two workers really run in parallel)."""
    if ctx.trial.number == 0:
        deadline = time.monotonic() + 90
        while len(ctx.trial.study.get_trials(deepcopy=False)) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the other worker never started a trial")
            time.sleep(0.1)
    fake_evaluate(ctx)


@pytest.mark.usefixtures("no_plots")
def test_two_workers_on_one_journal_make_distinct_trials_and_never_overshoot(tmp_path: Path):
    journal = tmp_path / "optuna.journal"
    study = run_study(
        "concl",
        "demo",
        trials=3,
        workers=2,
        storage=str(journal),
        evaluate="tests.benchmark.tune.test_worker:parallel_evaluate",
    )
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3
    assert sorted(by_name("trial")) == ["trial 0", "trial 1", "trial 2"]


def test_the_worker_entry_imports_the_worker_module():
    assert "from benchmark.tune.worker import worker_main" in WORKER_ENTRY


def waiting_evaluate(ctx: TrialContext) -> None:
    """Marks that its trial started, then waits to be stopped."""
    (Path(os.environ["TUNE_TEST_MARKS"]) / f"trial{ctx.trial.number}").touch()
    time.sleep(600)


_STUDY = """
import sys
from benchmark.tune.study import run_study
try:
    run_study("concl", "demo", trials=2, workers=2, storage=sys.argv[1],
              evaluate="tests.benchmark.tune.test_worker:waiting_evaluate")
except KeyboardInterrupt:
    sys.exit(130)
"""


@needs_proc
def test_sigterm_to_a_study_stops_its_workers_and_ends_their_trials(tmp_path: Path):
    """Before, only Ctrl-C was passed on: a SIGTERM to the study left both workers running
    their trials. Now each worker gets one SIGINT and ends its trial as interrupted."""
    marks = tmp_path / "marks"
    marks.mkdir()
    journal = tmp_path / "optuna.journal"
    study = subprocess.Popen(
        [sys.executable, "-c", _STUDY, str(journal)],
        cwd=REPO,
        env={**os.environ, "TUNE_TEST_MARKS": str(marks)},
    )
    processes: set[int] = set()
    try:
        processes = wait_for_tree(study, 2, 120)
        deadline = time.monotonic() + 180
        while len(list(marks.iterdir())) < 2:  # both workers are inside a trial
            assert study.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        study.send_signal(signal.SIGTERM)
        assert study.wait(timeout=120) == 130
        assert wait_gone(processes, 30) == set()
    finally:
        kill_tree(study, processes)
    opened = StudyStorage(str(journal), "journal").open()
    trials = optuna.load_study(study_name="concl-demo", storage=opened).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert {r.info.status for r in runs("trial")} == {"KILLED"}
    assert [r.info.status for r in runs("study")] == ["KILLED"]
