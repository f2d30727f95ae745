"""Fixtures of the tune tests: an MLflow store per test, made fast from one template."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import benchmark.tune.study


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its tables made once (migrations take seconds) and the
    experiment's artifacts in a temporary folder, not the repository's mlruns/."""
    root = tmp_path_factory.mktemp("mlflow-template")
    path = root / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").create_experiment(
        "concl-bench", artifact_location=(root / "artifacts").as_uri()
    )
    return path


@pytest.fixture(autouse=True)
def _fresh_mlflow(_mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test still gets its own empty store (a copy of the template)."""
    path = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots are checked once, in the real trial's test; elsewhere they only cost time."""
    monkeypatch.setattr(benchmark.tune.study, "write_plots", lambda study, out: [])


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"
