"""One store and one report for the whole folder (the report is the slow part: figures)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark.report import build_report
from benchmark.tracking import Tracker
from tests.benchmark.report._store import EXPERIMENT, fill

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="package")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # the suite's rule: the variable wins
        tracker = Tracker(EXPERIMENT, uri, str(root / "artifacts"))
        ids = fill(tracker)
        published = REPO / "experiments" / "paper" / "published.csv"
        result = build_report(uri, EXPERIMENT, root / "out", published=published)
    md = result.markdown.read_text()
    return SimpleNamespace(uri=uri, ids=ids, result=result, md=md, tracker=tracker)
