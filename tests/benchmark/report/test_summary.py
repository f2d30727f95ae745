"""The statistics on hand-chosen values: means, sample stds, n, bold marks, and Welch's
test against a hand computation."""

from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest

from benchmark.report.runs import load_published
from benchmark.report.summary import summary_table
from tests.benchmark.report._store import PAPER_CONCL, row, values, welch_by_hand


def test_means_stds_n_and_bold_marks(built):
    s = built.result.summary
    concl = row(s, "paper", "concl", PAPER_CONCL[3])
    assert concl["glas_bbox_AP_mean"] == pytest.approx(58.0)
    assert concl["glas_bbox_AP_std"] == pytest.approx(math.sqrt(14 / 3))
    assert concl["glas_n"] == 4 and concl["crag_n"] == 2
    densecl = row(s, "paper", "densecl", "dddd2000pppp")
    assert densecl["glas_n"] == 1 and math.isnan(densecl["glas_bbox_AP_std"])
    mocov2 = row(s, "paper", "mocov2", "mmmm2000pppp")
    # best per (profile, epochs) block; CRAG AP_mk is a tie (51.0 both) so both are bold
    assert concl["glas_bbox_AP_best"] and not mocov2["glas_bbox_AP_best"]
    assert concl["crag_segm_AP_best"] and mocov2["crag_segm_AP_best"]
    assert not densecl["crag_segm_AP_best"]
    alone = row(s, "paper", "concl", "cccc4000pppp")  # the only row at 400 epochs
    assert not alone["glas_bbox_AP_best"]
    assert list(s["profile"]) == ["paper"] * 4 + ["demo"] * 4
    assert list(s["method"][:4]) == ["mocov2", "densecl", "concl", "concl"]


def test_welch_against_hand_computation(built):
    s = built.result.summary
    concl = row(s, "paper", "concl", PAPER_CONCL[3])
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    for ds, metric, i in (("glas", "bbox_AP", 0), ("glas", "segm_AP", 1), ("crag", "bbox_AP", 0)):
        a, b = values(PAPER_CONCL, ds, i), values(base, ds, i)
        t, p = welch_by_hand(a, b)
        assert concl[f"{ds}_{metric}_t"] == pytest.approx(t, rel=1e-9)
        assert concl[f"{ds}_{metric}_p"] == pytest.approx(p, rel=1e-9)
        assert concl[f"{ds}_{metric}_delta"] == pytest.approx(
            statistics.fmean(a) - statistics.fmean(b)
        )
    # demo: the mocov2 baseline with most seeds (aaaa1111) is the reference
    demo = row(s, "demo", "concl", "cccc3333demo")
    t, p = welch_by_hand([25, 27], [20, 22])
    assert (demo["glas_bbox_AP_t"], demo["glas_bbox_AP_p"]) == (pytest.approx(t), pytest.approx(p))
    assert demo["baseline_config"] == "aaaa1111demo"
    # n = 1 on one side: a difference but no test; the baseline and a lone budget: nothing
    densecl = row(s, "paper", "densecl", "dddd2000pppp")
    assert densecl["glas_bbox_AP_delta"] == pytest.approx(1.0)
    assert math.isnan(densecl["glas_bbox_AP_p"]) and math.isnan(densecl["glas_bbox_AP_t"])
    for r in (row(s, "paper", "mocov2", "mmmm2000pppp"), row(s, "paper", "concl", "cccc4000pppp")):
        assert math.isnan(r["glas_bbox_AP_delta"]) and math.isnan(r["glas_bbox_AP_p"])


def test_summary_table_is_pure_and_published_file_matches_readme():
    published = load_published()  # experiments/paper/published.csv from the repository root
    assert len(published) == 19
    concl = published[(published["method"] == "concl") & (published["epochs"] == 800)].iloc[0]
    assert (concl["glas_bbox_AP"], concl["crag_bbox_AP"]) == (58.6, 55.0)
    assert set(published["method"]) == {
        "simclr",
        "byol",
        "pcl",
        "mocov1",
        "mocov2",
        "densecl",
        "concl",
    }
    seeds = pd.DataFrame(
        {
            "profile": "paper", "method": ["byol"] * 2 + ["mocov2"] * 2,
            "epochs": pd.array([400] * 4, dtype="Int64"), "config_hash": ["b"] * 2 + ["m"] * 2,
            "dataset": "glas", "seed": [1, 2, 1, 2], "bbox_AP": [50.0, 51.0, 53.0, 55.0],
            "segm_AP": [1.0, 2.0, 3.0, 4.0], "run_id": list("wxyz"), "parent_id": "p",
            "pretrain_hash": "h",
        }
    )  # fmt: skip
    out = summary_table(seeds, published, baseline="byol")
    mocov2 = out[out["method"] == "mocov2"].iloc[0]
    t, p = welch_by_hand([53, 55], [50, 51])
    assert (mocov2["glas_bbox_AP_t"], mocov2["glas_bbox_AP_p"]) == (
        pytest.approx(t),
        pytest.approx(p),
    )
    assert mocov2["glas_bbox_AP_paper_delta"] == pytest.approx(54.0 - 54.6)
    assert out["crag_n"].tolist() == [0, 0]
