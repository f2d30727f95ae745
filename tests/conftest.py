"""Shared fixtures: every test runs against a temporary MLflow store, never mlruns/."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background (``make test &``) inherits SIGINT ignored from the
    shell, and so would every process a test starts (an ignored signal survives ``exec``),
    while the signal tests model a terminal's foreground job, where Ctrl-C arrives. Python's
    own handler (caught, hence back to the default in each child) restores that."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point MLflow at a throw-away sqlite file and run from the repository root."""
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(REPO)
    yield
