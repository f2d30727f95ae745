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
    assert (out["glas_seeds"], out["crag_seeds"]) == (2.0, 1.0)
    # the report's percentile bootstrap over 2 seeds: resampled means are 50, 52 or 54 with
    # probabilities 1/4, 1/2, 1/4, so the 2.5th and 97.5th percentiles are 50 and 54
    assert (out["glas_bbox_AP_ci_low"], out["glas_bbox_AP_ci_high"]) == (50.0, 54.0)
    assert (out["glas_segm_AP_ci_low"], out["glas_segm_AP_ci_high"]) == (40.0, 44.0)
    assert "crag_bbox_AP_ci_low" not in out  # one seed: no interval
    assert len(out) == 14


def test_results_table_shows_no_spread_for_one_seed():
    summary = aggregate(
        {
            "glas": [{"bbox_AP": 50.0, "segm_AP": 40.0}, {"bbox_AP": 54.0, "segm_AP": 44.0}],
            "crag": [{"bbox_AP": 30.0, "segm_AP": 20.0}],
        }
    )
    table = results_table("mocov2", 200, summary).splitlines()
    assert table[0] == "| method | epochs | GlaS AP_bb | GlaS AP_mk | CRAG AP_bb | CRAG AP_mk |"
    assert table[2] == "| mocov2 | 200 | 52.0 ± 2.8 | 42.0 ± 2.8 | 30.0 ± – | 20.0 ± – |"
    assert table[3] == "(COCO AP, mean ± sample std over 2 GlaS seeds, 1 CRAG seed)"
