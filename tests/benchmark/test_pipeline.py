from __future__ import annotations

import statistics

import pytest

from benchmark.pipeline import aggregate, results_table


def test_aggregate_mean_and_sample_std():
    runs = {
        "glas": [{"bbox_AP": 50.0, "segm_AP": 40.0}, {"bbox_AP": 54.0, "segm_AP": 44.0}],
        "crag": [{"bbox_AP": 30.0, "segm_AP": 20.0}],
    }
    out = aggregate(runs)
    assert out["glas_bbox_AP_mean"] == 52.0
    assert out["glas_bbox_AP_std"] == pytest.approx(statistics.stdev([50.0, 54.0]))
    assert out["glas_segm_AP_mean"] == 42.0
    assert out["crag_bbox_AP_std"] == 0.0  # one seed
    assert len(out) == 8


def test_results_table_row():
    summary = aggregate({"glas": [{"bbox_AP": 50.0, "segm_AP": 40.0}]})
    table = results_table("mocov2", 200, summary, 1).splitlines()
    assert table[0] == "| method | epochs | GlaS AP_bb | GlaS AP_mk |"
    assert table[2] == "| mocov2 | 200 | 50.0 ± 0.0 | 40.0 ± 0.0 |"
