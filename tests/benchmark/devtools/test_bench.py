"""``make bench`` runs end to end and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.devtools.bench import STEP_COST_TARGETS, main


def test_bench_reports_overhead_and_step_cost_relative_to_mocov2(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--out", str(out), "--steps", "2", "--repeats", "1", "--no-finetune"]
    args += ["--methods", "concl", "mocov2", "--step-size", "64", "--step-steps", "1"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    for name in ("concl", "mocov2"):
        result = report["methods"][name]
        assert result["images_per_sec"] > 0 and result["bare_images_per_sec"] > 0
        # the rates are reported to 0.01 img/s, so their quotient matches to about 1 %
        quotient = result["images_per_sec"] / result["bare_images_per_sec"]
        assert result["ratio"] == pytest.approx(quotient, rel=1e-2)
    cost = report["step_cost"]
    seconds = cost["seconds_per_step"]
    assert cost["relative_to_mocov2"]["mocov2"] == 1.0
    relative = seconds["concl"] / seconds["mocov2"]
    assert cost["relative_to_mocov2"]["concl"] == pytest.approx(relative, rel=1e-2)
    assert cost["targets"] == STEP_COST_TARGETS
