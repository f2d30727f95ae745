"""``make bench`` runs end to end and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark.bench import STEP_COST_TARGETS, main


def test_bench_reports_overhead_and_step_cost_relative_to_mocov2(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--out", str(out), "--steps", "2", "--repeats", "1", "--no-finetune"]
    args += ["--methods", "concl", "mocov2", "--step-size", "64", "--step-steps", "1"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    for name in ("concl", "mocov2"):
        result = report["methods"][name]
        assert result["images_per_sec"] > 0 and result["bare_images_per_sec"] > 0
        assert (
            abs(result["ratio"] - result["images_per_sec"] / result["bare_images_per_sec"]) < 1e-3
        )
    cost = report["step_cost"]
    seconds = cost["seconds_per_step"]
    assert cost["relative_to_mocov2"]["mocov2"] == 1.0
    assert abs(cost["relative_to_mocov2"]["concl"] - seconds["concl"] / seconds["mocov2"]) < 1e-2
    assert cost["targets"] == STEP_COST_TARGETS
