"""The tables as written: exact cells of every ``results.md`` section and the CSV."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.report.table import column, mean_std, results_table
from tests.benchmark.report._store import (
    PAPER_CONCL,
    paired_by_hand,
    row,
    scipy_ci,
    section,
    table_rows,
    values,
)


def _ci(key, ds: str, metric: int, bold: bool = False) -> str:
    x = values(key, ds, metric)
    if len(x) == 1:
        return f"{x[0]:.1f} [–]"
    low, high = scipy_ci(x)
    text = f"{sum(x) / len(x):.1f} [{low:.1f}, {high:.1f}]"
    return f"**{text}**" if bold else text


def test_paper_section_table(built):
    paper = section(built.md, "Paper profile")
    rows = table_rows(paper)
    assert rows[0] == [
        "method", "pre-training epochs",
        "GlaS AP_bb", "GlaS AP_mk", "GlaS n", "CRAG AP_bb", "CRAG AP_mk", "CRAG n",
        "Δ GlaS AP_bb vs mocov2 (Holm p)", "Δ CRAG AP_bb vs mocov2 (Holm p)",
        "paper GlaS AP_bb (ours − paper)", "paper CRAG AP_bb (ours − paper)",
    ]  # fmt: skip
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    dense = ("paper", "densecl", 200, "dddd2000pppp")
    c400 = ("paper", "concl", 400, "cccc4000pppp")
    # one test per family (densecl has one seed): Holm's p is the paired p
    p_glas = paired_by_hand(values(PAPER_CONCL, "glas", 0), values(base, "glas", 0))[2]
    p_crag = paired_by_hand(values(PAPER_CONCL, "crag", 0), values(base, "crag", 0))[2]
    assert rows[1:] == [
        ["mocov2", "200", _ci(base, "glas", 0), _ci(base, "glas", 1), "3", _ci(base, "crag", 0),
         _ci(base, "crag", 1, bold=True), "2", "–", "–", "52.3 (-0.3)", "50.0 (-1.0)"],
        ["densecl", "200", "53.0 [–]", "54.0 [–]", "1", "51.0 [–]", "49.0 [–]", "1",
         "+1.0 (p –)", "+2.0 (p –)", "53.9 (-0.9)", "52.3 (-1.3)"],
        ["concl", "200", *(_ci(PAPER_CONCL, "glas", i, bold=True) for i in (0, 1)), "4",
         *(_ci(PAPER_CONCL, "crag", i, bold=True) for i in (0, 1)), "2",
         f"+5.0 (p {p_glas:.3f})", f"+6.5 (p {p_crag:.3f})", "56.8 (+1.2)", "55.4 (+0.1)"],
        ["concl", "400", *(_ci(c400, "glas", i) for i in (0, 1)), "2",
         *(_ci(c400, "crag", i) for i in (0, 1)), "2", "–", "–", "58.2 (+0.3)", "54.7 (-0.2)"],
    ]  # fmt: skip
    assert _ci(dense, "glas", 0) == "53.0 [–]"
    assert "config" not in rows[0]  # one config per method and budget
    assert "Bold: the best mean" in paper
    assert "± 0.0" not in built.md


def test_paper_comparison_marks_what_the_seeds_resolve(built):
    rows = table_rows(section(built.md, "Paper: fine-tuning vs mocov2"))
    assert rows[0] == [
        "method", "pre-training epochs", "metric", "Δ vs mocov2 [95 % CI]", "test", "p",
        "Holm p", "verdict", "MDD", "seeds for Δ = 1",
    ]  # fmt: skip
    by = {(r[0], r[2]): r for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == ["densecl"] * 4 + ["concl"] * 4
    s = built.result.summary
    concl = row(s, "paper", "concl", PAPER_CONCL[3])
    glas = by["concl", "GlaS AP_bb"]
    low, high = concl["glas_bbox_AP_delta_ci_low"], concl["glas_bbox_AP_delta_ci_high"]
    assert glas[3] == f"+5.0 [{low:+.1f}, {high:+.1f}]" and glas[4] == "paired, 3 seeds"
    assert glas[7] == "resolved" and low > 0
    assert glas[8] == f"{concl['glas_bbox_AP_mdd']:.1f}"
    assert glas[9] == str(int(concl["glas_bbox_AP_seeds_needed"]))
    # CRAG AP_mk: paired differences +0.5 and -0.5, the interval covers 0
    assert by["concl", "CRAG AP_mk"][3:8] == [
        "0.0 [-0.5, +0.5]", "paired, 2 seeds", "1.000", "1.000", "not resolved",
    ]  # fmt: skip
    # one densecl seed: no test, no verdict, but how many seeds it would take
    dense = by["densecl", "GlaS AP_bb"]
    assert dense[3:8] == ["+1.0 [–]", "– (1 seed)", "–", "–", "–"]
    assert int(dense[9]) >= 2
    note = section(built.md, "Paper: fine-tuning vs mocov2")
    assert "Not compared (no mocov2 row" in note and "concl 400 ep" in note


def test_demo_section_table_and_preamble(built):
    md = built.md
    assert md.index("## Paper profile") < md.index("## Demo profile")
    demo = section(md, "Demo profile")
    rows = table_rows(demo)
    assert rows[0] == [
        "method", "pre-training epochs", "config", "GlaS AP_bb", "GlaS AP_mk", "GlaS n",
        "Δ GlaS AP_bb vs mocov2 (Holm p)",
    ]  # fmt: skip
    # two seeds: the percentile interval is [min, max]; concl is 5 points above the
    # baseline on both seeds, an exact paired difference (p = 0)
    assert rows[1:] == [
        ["mocov2", "2", "aaaa1111", "21.0 [20.0, 22.0]", "20.0 [19.0, 21.0]", "2", "–"],
        ["mocov2", "2", "bbbb2222", "21.0 [–]", "22.0 [–]", "1", "0.0 (p –)"],
        ["concl", "2", "cccc3333", "**26.0 [25.0, 27.0]**", "**25.0 [24.0, 26.0]**", "2",
         "+5.0 (p < 0.001)"],
        ["random", "–", "rrrr0000", "15.0 [–]", "14.0 [–]", "1", "–"],
    ]  # fmt: skip
    compared = section(md, "Demo: fine-tuning vs mocov2")
    assert "shared dataset): random.\n" in compared
    assert "paper's numbers do not apply" in demo
    assert "paper GlaS" not in demo and "published" not in demo
    for phrase in ("sample standard deviation", "Mask R-CNN", "ResNet-18-FPN", "COCO AP",
                   "Welch", "ttest_rel", "Holm", "not resolved", "vs mocov2"):  # fmt: skip
        assert phrase in md.split("## ")[0]


def test_csv_has_every_row_and_all_four_tests(built):
    csv = pd.read_csv(built.result.csv)
    assert len(csv) == 8 and list(csv["profile"].unique()) == ["paper", "demo"]
    concl = csv[csv["config_hash"] == PAPER_CONCL[3]].iloc[0]
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    for ds, metric, i in (("glas", "segm_AP", 1), ("crag", "segm_AP", 1)):
        _, t, p = paired_by_hand(values(PAPER_CONCL, ds, i), values(base, ds, i))
        assert concl[f"{ds}_{metric}_t"] == pytest.approx(t, rel=1e-5, abs=1e-9)
        assert concl[f"{ds}_{metric}_p"] == pytest.approx(p, rel=1e-5)
        assert concl[f"{ds}_{metric}_test"] == "paired"
    assert concl["glas_bbox_AP_resolved"] and not concl["crag_segm_AP_resolved"]
    for ds in ("glas", "crag"):
        for m in ("bbox_AP", "segm_AP"):
            for s in ("ci_low", "ci_high", "delta_ci_low", "delta_ci_high", "p_holm", "mdd",
                      "seeds_needed", "pairs"):  # fmt: skip
                assert f"{ds}_{m}_{s}" in csv
    assert concl["glas_bbox_AP_paper"] == 56.8
    assert csv.loc[csv["profile"] == "demo", "glas_bbox_AP_paper"].isna().all()


def test_benchmark_row_and_report_cells_share_one_format():
    # the row ``make benchmark`` prints and the report's cells come from the same helpers
    assert column("glas", "bbox_AP") == "GlaS AP_bb" and column("crag", "segm_AP") == "CRAG AP_mk"
    assert mean_std(52.04, 2.83) == "52.0 ± 2.8"
    assert mean_std(30.0, None) == mean_std(30.0, float("nan")) == "30.0 ± –"
    summary = {"glas_bbox_AP_mean": 53.0, "glas_bbox_AP_std": 0.0, "glas_seeds": 1.0}
    assert results_table("densecl", 200, summary).splitlines() == [
        "| method | epochs | GlaS AP_bb |",
        "|---|---|---|",
        "| densecl | 200 | 53.0 ± – |",
        "(COCO AP, mean ± sample std over 1 GlaS seed)",
    ]
