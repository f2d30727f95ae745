"""The probe tier of the report on the store's hand-made probe runs: what is read back, the
statistics against hand computations, and the tables (results.md, probes.csv, the row
``make benchmark`` prints)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from benchmark.core.schema import PROBES
from benchmark.report.runs import _per_image, load_per_image, load_runs, probe_frame
from benchmark.report.statistics import hierarchical_ci
from benchmark.report.table import results_table
from tests.benchmark.report._store import (
    EXPERIMENT,
    NO_PER_IMAGE,
    PAPER_CONCL,
    PAPER_CONCL_400,
    PAPER_MOCOV2,
    PAPER_SUPERVISED,
    PROBE_RUNS,
    TISSUE_LABELS,
    paired_by_hand,
    probe_values,
    row,
    scipy_ci,
    section,
    table_rows,
)


def prow(summary: pd.DataFrame, key: tuple) -> pd.Series:
    return row(summary, key[0], key[1], key[3])


def test_probe_frame_holds_only_finished_known_probes(built):
    probes = built.result.probes
    expected = sum(len(v) for per in PROBE_RUNS.values() for v in per.values())
    assert len(probes) == expected  # no running, failed or unknown ("svm") probe
    assert set(zip(probes["dataset"], probes["probe"], strict=True)) <= set(PROBES)
    assert {0.0, 99.0}.isdisjoint(probes["balanced_accuracy"])  # the left-out runs' values
    concl = probes[(probes["config_hash"] == PAPER_CONCL[3]) & (probes["probe"] == "knn")]
    assert list(concl["seed"]) == [1, 2, 3]
    assert concl["dice"].isna().all()  # a tissue probe logs no Dice
    assert (probes.loc[probes["method"] == "supervised", "epochs"] == 200).all()
    assert probes.loc[probes["method"] == "random", "epochs"].isna().all()
    client = MlflowClient(built.uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    pd.testing.assert_frame_equal(probe_frame(load_runs(client, exp)), probes)


def test_per_image_results_load_and_a_missing_one_degrades(built):
    probes = built.result.probes
    per_image = load_per_image(MlflowClient(built.uri), probes)
    assert set(per_image) == set(probes["run_id"])
    key, (ds, probe), seed = NO_PER_IMAGE
    missing = built.ids[f"{key[3]}/{ds}/{probe}/{seed}"]
    assert per_image[missing] is None
    first = per_image[built.ids[f"{PAPER_CONCL[3]}/tissue/knn/1"]]
    assert first["labels"].tolist() == TISSUE_LABELS
    assert first["predictions"].tolist() == PROBE_RUNS[PAPER_CONCL]["tissue", "knn"][0]
    dense = per_image[built.ids[f"{PAPER_CONCL[3]}/glas/dense/2"]]
    assert dense["dice"].tolist() == PROBE_RUNS[PAPER_CONCL]["glas", "dense"][1]
    # a malformed file degrades the same way
    assert _per_image({"labels": [0, 1], "predictions": [0]}, ("balanced_accuracy",)) is None
    assert _per_image({"dice": [80.0, float("nan")], "iou": [1.0, 2.0]}, ("dice", "iou")) is None


def test_probe_summary_against_hand_computation(built):
    s = built.result.probe_summary
    concl, base = prow(s, PAPER_CONCL), prow(s, PAPER_MOCOV2)
    for ds, probe, m in (("tissue", "knn", "balanced_accuracy"), ("glas", "dense", "dice")):
        a, b = probe_values(PAPER_CONCL, ds, probe, m), probe_values(PAPER_MOCOV2, ds, probe, m)
        key = f"{ds}_{probe}_{m}"
        assert concl[f"{key}_mean"] == pytest.approx(statistics.fmean(a))
        assert concl[f"{key}_std"] == pytest.approx(statistics.stdev(a))
        assert concl[f"{ds}_{probe}_n"] == 3 and concl[f"{key}_ci_kind"] == "seeds × images"
        delta, t, p = paired_by_hand(a, b)
        assert concl[f"{key}_test"] == "paired"
        assert (concl[f"{key}_delta"], concl[f"{key}_t"], concl[f"{key}_p"]) == (
            pytest.approx(delta),
            pytest.approx(t),
            pytest.approx(p),
        )
        assert math.isnan(base[f"{key}_delta"])  # the baseline itself
    # the interval is the two-level bootstrap of the logged per-image arrays
    specs = PROBE_RUNS[PAPER_CONCL]["tissue", "knn"]
    ci = hierarchical_ci(
        [(np.array(TISSUE_LABELS), np.array(p)) for p in specs], "balanced_accuracy"
    )
    bacc = "tissue_knn_balanced_accuracy"
    assert (concl[f"{bacc}_ci_low"], concl[f"{bacc}_ci_high"]) == (
        pytest.approx(ci.low),
        pytest.approx(ci.high),
    )
    dice = [np.array(d, dtype=float) for d in PROBE_RUNS[PAPER_CONCL]["glas", "dense"]]
    ci = hierarchical_ci(dice)
    assert concl["glas_dense_dice_ci_low"] == pytest.approx(ci.low)
    # concl 400 lacks one per_image.json: its interval is over the seeds only
    c400 = prow(s, PAPER_CONCL_400)
    assert c400["tissue_knn_balanced_accuracy_ci_kind"] == "seeds"
    low, high = scipy_ci(probe_values(PAPER_CONCL_400, "tissue", "knn", "balanced_accuracy"))
    assert (c400[f"{bacc}_ci_low"], c400[f"{bacc}_ci_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    # Holm over concl and supervised (both at 200 epochs) for k-NN bAcc, by hand
    sup = prow(s, PAPER_SUPERVISED)
    m = "balanced_accuracy"
    p_concl = paired_by_hand(probe_values(PAPER_CONCL, "tissue", "knn", m),
                             probe_values(PAPER_MOCOV2, "tissue", "knn", m))[2]  # fmt: skip
    p_sup = paired_by_hand(probe_values(PAPER_SUPERVISED, "tissue", "knn", m),
                           probe_values(PAPER_MOCOV2, "tissue", "knn", m))[2]  # fmt: skip
    small, large = sorted([p_concl, p_sup])
    holm = {small: min(1, 2 * small), large: min(1, max(2 * small, large))}
    assert concl[f"tissue_knn_{m}_p_holm"] == pytest.approx(holm[p_concl])
    assert sup[f"tissue_knn_{m}_p_holm"] == pytest.approx(holm[p_sup])
    assert sup[f"tissue_knn_{m}_pairs"] == 2
    # resolved: the interval of Δ excludes 0
    for r in (concl, sup):
        lo, hi = r[f"tissue_knn_{m}_delta_ci_low"], r[f"tissue_knn_{m}_delta_ci_high"]
        assert r[f"tissue_knn_{m}_resolved"] == (lo > 0 or hi < 0)
    assert math.isfinite(concl[f"{bacc}_mdd"]) and concl[f"{bacc}_seeds_needed"] >= 2


def test_probe_section_and_csv(built):
    rows = table_rows(section(built.md, "Paper: frozen-backbone probes"))
    assert rows[0] == [
        "method", "pre-training epochs", "Tissue k-NN bAcc", "Tissue k-NN F1", "Tissue k-NN n",
        "GlaS dense Dice", "GlaS dense IoU", "GlaS dense n",
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["mocov2", "concl", "supervised", "concl"]
    s = built.result.probe_summary
    concl = prow(s, PAPER_CONCL)
    bacc = probe_values(PAPER_CONCL, "tissue", "knn", "balanced_accuracy")
    low, high = (concl[f"tissue_knn_balanced_accuracy_ci_{s}"] for s in ("low", "high"))
    assert rows[2][2] == f"{statistics.fmean(bacc):.1f} [{low:.1f}, {high:.1f}]"
    assert rows[3][5:] == ["–", "–", "0"]  # supervised ran no dense probe
    compared = table_rows(section(built.md, "Paper: probes vs mocov2"))
    by = {(r[0], r[2]): r for r in compared[1:]}
    assert set(by) == {
        (m, c)
        for m in ("concl", "supervised")
        for c in ("Tissue k-NN bAcc", "Tissue k-NN F1", "GlaS dense Dice", "GlaS dense IoU")
    } - {("supervised", "GlaS dense Dice"), ("supervised", "GlaS dense IoU")}
    for (method, title), line in by.items():
        verdict = line[7]
        assert verdict in {"resolved", "resolved†", "not resolved"}
        lo, hi = (float(x) for x in line[3].split("[")[1].rstrip("]").split(", "))
        assert (verdict == "not resolved") == (lo <= 0 <= hi), (method, title)
    assert "no mocov2 row" in section(built.md, "Paper: probes vs mocov2")
    demo = table_rows(section(built.md, "Demo: frozen-backbone probes"))
    assert [r[0] for r in demo[1:]] == ["mocov2", "random"]  # reference rows shown too
    csv = pd.read_csv(built.result.probes_csv)
    assert len(csv) == len(s) == 6
    first = csv[csv["config_hash"] == PAPER_CONCL[3]].iloc[0]
    assert first["tissue_knn_balanced_accuracy_mean"] == pytest.approx(statistics.fmean(bacc))
    assert first["tissue_knn_balanced_accuracy_test"] == "paired"
    for col in ("ci_low", "ci_high", "ci_kind", "delta_ci_low", "p_holm", "resolved", "mdd",
                "seeds_needed"):  # fmt: skip
        assert f"crag_dense_dice_{col}" in csv  # every probe's columns, even without runs
    assert csv["crag_dense_n"].eq(0).all()


def test_benchmark_row_shows_probe_headlines_beside_ap():
    summary = {
        "glas_bbox_AP_mean": 53.0, "glas_bbox_AP_std": 1.0, "glas_seeds": 2.0,
        "tissue_knn_balanced_accuracy_mean": 91.25, "tissue_knn_balanced_accuracy_std": 1.5,
        "tissue_knn_macro_f1_mean": 90.0, "tissue_knn_seeds": 3.0,
        "glas_dense_dice_mean": 80.0, "glas_dense_dice_std": 0.0, "glas_dense_seeds": 1.0,
    }  # fmt: skip
    assert results_table("concl", 200, summary).splitlines() == [
        "| method | epochs | GlaS AP_bb | Tissue k-NN bAcc | GlaS dense Dice |",
        "|---|---|---|---|---|",
        "| concl | 200 | 53.0 ± 1.0 | 91.2 ± 1.5 | 80.0 ± – |",
        "(COCO AP, mean ± sample std over 2 GlaS seeds; probes in %, mean ± sample std over "
        "seeds: 3 Tissue k-NN, 1 GlaS dense)",
    ]
