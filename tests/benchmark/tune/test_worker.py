"""Worker processes: a shared journal, distinct trials, no overshoot of TRIALS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from benchmark.tune.objective import TrialContext
from benchmark.tune.study import run_study
from benchmark.tune.worker import WORKER_ENTRY
from tests.benchmark.tune._helpers import by_name, fake_evaluate


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
