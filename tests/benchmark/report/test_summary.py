"""The statistics on hand-chosen values: means, sample stds, n, bold marks, intervals, the
paired / Welch comparison and Holm's correction against hand computations."""

from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest
from scipy import stats

from benchmark.report.runs import load_published
from benchmark.report.summary import summary_table
from tests.benchmark.report._store import (
    PAPER_CONCL,
    paired_by_hand,
    row,
    scipy_ci,
    values,
    welch_by_hand,
)


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


def test_paired_comparison_and_intervals_against_hand_computation(built):
    s = built.result.summary
    concl = row(s, "paper", "concl", PAPER_CONCL[3])
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    # concl has GlaS seeds 1-4, mocov2 1-3: seeds 1-3 pair; CRAG seeds 1-2 pair
    for ds, metric, i in (("glas", "bbox_AP", 0), ("glas", "segm_AP", 1), ("crag", "bbox_AP", 0)):
        a, b = values(PAPER_CONCL, ds, i), values(base, ds, i)
        delta, t, p = paired_by_hand(a, b)
        assert concl[f"{ds}_{metric}_test"] == "paired"
        assert concl[f"{ds}_{metric}_pairs"] == min(len(a), len(b))
        assert concl[f"{ds}_{metric}_t"] == pytest.approx(t, rel=1e-9)
        assert concl[f"{ds}_{metric}_p"] == pytest.approx(p, rel=1e-9)
        assert concl[f"{ds}_{metric}_p_holm"] == pytest.approx(p)  # the only test of its family
        assert concl[f"{ds}_{metric}_delta"] == pytest.approx(delta)
        low, high = scipy_ci([x - y for x, y in zip(a, b, strict=False)])
        assert concl[f"{ds}_{metric}_delta_ci_low"] == pytest.approx(low)
        assert concl[f"{ds}_{metric}_delta_ci_high"] == pytest.approx(high)
        ci = (concl[f"{ds}_{metric}_ci_low"], concl[f"{ds}_{metric}_ci_high"])
        assert ci == pytest.approx(scipy_ci(a))
        assert concl[f"{ds}_{metric}_resolved"] is (low > 0 or high < 0)
    # CRAG AP_mk: differences +0.5 and -0.5: t = 0, the interval covers 0
    assert concl["crag_segm_AP_t"] == pytest.approx(0.0) and concl["crag_segm_AP_p"] == 1.0
    assert concl["crag_segm_AP_resolved"] is False
    # demo: the mocov2 baseline with most seeds (aaaa1111) is the reference; both seeds are
    # 5 points better, so the paired interval is the degenerate [5, 5]
    demo = row(s, "demo", "concl", "cccc3333demo")
    assert demo["baseline_config"] == "aaaa1111demo"
    assert (demo["glas_bbox_AP_delta_ci_low"], demo["glas_bbox_AP_delta_ci_high"]) == (5.0, 5.0)
    assert demo["glas_bbox_AP_p"] == 0.0 and demo["glas_bbox_AP_resolved"] is True
    # n = 1 on one side: a difference, no test and no interval, but the baseline's spread
    # still gives the MDD and the seeds needed; the baseline and a lone budget: nothing
    densecl = row(s, "paper", "densecl", "dddd2000pppp")
    assert densecl["glas_bbox_AP_delta"] == pytest.approx(1.0)
    assert math.isnan(densecl["glas_bbox_AP_p"]) and math.isnan(densecl["glas_bbox_AP_t"])
    assert pd.isna(densecl["glas_bbox_AP_test"]) and pd.isna(densecl["glas_bbox_AP_resolved"])
    assert densecl["glas_bbox_AP_seeds_needed"] >= 2 and densecl["glas_bbox_AP_mdd"] > 1
    for r in (row(s, "paper", "mocov2", "mmmm2000pppp"), row(s, "paper", "concl", "cccc4000pppp")):
        assert math.isnan(r["glas_bbox_AP_delta"]) and math.isnan(r["glas_bbox_AP_p"])
        assert math.isnan(r["glas_bbox_AP_mdd"]) and pd.isna(r["glas_bbox_AP_resolved"])


def _seeds(rows: list[tuple[str, int, float]], epochs: list) -> pd.DataFrame:
    """A seed frame of GlaS runs: (method, seed, bbox_AP) each; segm_AP = bbox_AP − 1."""
    return pd.DataFrame(
        {
            "profile": "paper",
            "method": [m for m, _, _ in rows],
            "epochs": pd.array(epochs, dtype="Int64"),
            "config_hash": [m[0] * 4 for m, _, _ in rows],
            "dataset": "glas",
            "seed": [s for _, s, _ in rows],
            "bbox_AP": [v for _, _, v in rows],
            "segm_AP": [v - 1 for _, _, v in rows],
            "run_id": [f"r{i}" for i in range(len(rows))],
            "parent_id": "p",
            "pretrain_hash": "h",
        }
    )


def test_holm_runs_over_the_methods_of_one_budget_and_reference_rows_come_last():
    per = {
        "mocov2": [50.0, 52.0, 51.0],
        "byol": [51.0, 53.5, 51.5],
        "concl": [55.0, 56.0, 58.0],
        "supervised": [53.0, 52.0, 54.5],
        "random": [40.0, 41.0, 39.0],
    }
    rows = [(m, i + 1, v) for m, vs in per.items() for i, v in enumerate(vs)]
    epochs = [None if m == "random" else 200 for m, _, _ in rows]
    out = summary_table(_seeds(rows, epochs), baseline="mocov2", delta=2.0)
    assert list(out["method"]) == ["byol", "mocov2", "concl", "supervised", "random"]
    family = ["byol", "concl", "supervised"]  # random has no budget: no mocov2 to compare
    raw = [paired_by_hand(per[m], per["mocov2"])[2] for m in family]
    # Holm by hand: sort, multiply by (k − rank), running maximum, cap at 1
    order = sorted(range(3), key=lambda i: raw[i])
    adjusted, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        adjusted[i] = running
    got = out.set_index("method")
    for m, p, p_holm in zip(family, raw, adjusted, strict=True):
        assert got.at[m, "glas_bbox_AP_p"] == pytest.approx(p)
        assert got.at[m, "glas_bbox_AP_p_holm"] == pytest.approx(p_holm)
    assert math.isnan(got.at["random", "glas_bbox_AP_p_holm"])
    assert got.at["supervised", "epochs"] == 200 and pd.isna(got.at["random", "epochs"])
    # intervals over seeds; with 3 seeds the percentile interval is [min, max]
    low, high = scipy_ci(per["concl"])
    assert (got.at["concl", "glas_bbox_AP_ci_low"], got.at["concl", "glas_bbox_AP_ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    # seeds needed for Δ = 2 at concl's paired spread, from the noncentral t directly
    d = [x - y for x, y in zip(per["concl"], per["mocov2"], strict=True)]
    effect = 2.0 / statistics.stdev(d)

    def power(n: int) -> float:
        crit, nc = stats.t.ppf(0.975, n - 1), effect * math.sqrt(n)
        return stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)

    first = next(n for n in range(2, 200) if power(n) >= 0.8)
    assert got.at["concl", "glas_bbox_AP_seeds_needed"] == first


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
    _, t, p = paired_by_hand([53, 55], [50, 51])  # seeds 1 and 2 on both rows pair
    assert (mocov2["glas_bbox_AP_t"], mocov2["glas_bbox_AP_p"]) == (
        pytest.approx(t),
        pytest.approx(p),
    )
    # unpaired seed numbers: Welch
    unpaired = summary_table(seeds.assign(seed=[1, 2, 3, 4]), published, baseline="byol")
    mocov2 = unpaired[unpaired["method"] == "mocov2"].iloc[0]
    t, p = welch_by_hand([53, 55], [50, 51])
    assert mocov2["glas_bbox_AP_test"] == "welch"
    assert (mocov2["glas_bbox_AP_t"], mocov2["glas_bbox_AP_p"]) == (
        pytest.approx(t),
        pytest.approx(p),
    )
    assert mocov2["glas_bbox_AP_paper_delta"] == pytest.approx(54.0 - 54.6)
    assert out["crag_n"].tolist() == [0, 0]


def test_random_init_as_baseline_compares_with_every_pre_trained_row_of_its_profile():
    per = {
        "mocov2": ([50.0, 52.0, 51.0], 200),
        "concl": ([55.0, 56.0, 58.0], 400),
        "random": ([40.0, 41.0, 39.0], None),
    }
    rows = [(m, i + 1, v) for m, (vs, _) in per.items() for i, v in enumerate(vs)]
    epochs = [per[m][1] for m, _, _ in rows]
    got = summary_table(_seeds(rows, epochs), baseline="random").set_index("method")
    raw = {m: paired_by_hand(per[m][0], per["random"][0])[2] for m in ("mocov2", "concl")}
    for m in raw:  # different budgets, one family: the profile
        assert got.at[m, "glas_bbox_AP_delta"] == pytest.approx(
            statistics.fmean(per[m][0]) - statistics.fmean(per["random"][0])
        )
        assert got.at[m, "glas_bbox_AP_p"] == pytest.approx(raw[m])
    small, large = sorted(raw.values())
    holm = {
        m: min(1.0, 2 * p) if p == small else max(min(1.0, 2 * small), p) for m, p in raw.items()
    }
    for m, p_holm in holm.items():
        assert got.at[m, "glas_bbox_AP_p_holm"] == pytest.approx(p_holm)
    assert math.isnan(got.at["random", "glas_bbox_AP_p"])
