"""The tables as written: exact cells of every ``results.md`` section and the CSV."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.report.table import column, mean_std, results_table
from tests.benchmark.report._store import (
    PAPER_CONCL,
    section,
    table_rows,
    values,
    welch_by_hand,
)


def test_paper_section_table(built):
    paper = section(built.md, "Paper profile")
    rows = table_rows(paper)
    assert rows[0] == [
        "method", "pre-training epochs",
        "GlaS AP_bb", "GlaS AP_mk", "GlaS n", "CRAG AP_bb", "CRAG AP_mk", "CRAG n",
        "Δ GlaS AP_bb vs mocov2 (p)", "Δ CRAG AP_bb vs mocov2 (p)",
        "paper GlaS AP_bb (ours − paper)", "paper CRAG AP_bb (ours − paper)",
    ]  # fmt: skip
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    p_glas = welch_by_hand(values(PAPER_CONCL, "glas", 0), values(base, "glas", 0))[1]
    p_crag = welch_by_hand(values(PAPER_CONCL, "crag", 0), values(base, "crag", 0))[1]
    assert rows[1:] == [
        ["mocov2", "200", "52.0 ± 2.0", "53.0 ± 2.0", "3", "49.0 ± 1.4", "**51.0 ± 1.4**", "2",
         "–", "–", "52.3 (-0.3)", "50.0 (-1.0)"],
        ["densecl", "200", "53.0 ± –", "54.0 ± –", "1", "51.0 ± –", "49.0 ± –", "1",
         "+1.0 (p –)", "+2.0 (p –)", "53.9 (-0.9)", "52.3 (-1.3)"],
        ["concl", "200", "**58.0 ± 2.2**", "**59.0 ± 2.2**", "4", "**55.5 ± 0.7**",
         "**51.0 ± 0.7**", "2", f"+6.0 (p {p_glas:.3f})", f"+6.5 (p {p_crag:.3f})",
         "56.8 (+1.2)", "55.4 (+0.1)"],
        ["concl", "400", "58.5 ± 0.7", "59.5 ± 0.7", "2", "54.5 ± 0.7", "53.5 ± 0.7", "2",
         "–", "–", "58.2 (+0.3)", "54.7 (-0.2)"],
    ]  # fmt: skip
    assert "config" not in rows[0]  # one config per method and budget
    assert "Bold: the best mean" in paper
    assert "± 0.0" not in built.md


def test_demo_section_table_and_preamble(built):
    md = built.md
    assert md.index("## Paper profile") < md.index("## Demo profile")
    demo = section(md, "Demo profile")
    rows = table_rows(demo)
    p = welch_by_hand([25, 27], [20, 22])[1]
    assert rows[0] == [
        "method", "pre-training epochs", "config", "GlaS AP_bb", "GlaS AP_mk", "GlaS n",
        "Δ GlaS AP_bb vs mocov2 (p)",
    ]  # fmt: skip
    assert rows[1:] == [
        ["mocov2", "2", "aaaa1111", "21.0 ± 1.4", "20.0 ± 1.4", "2", "–"],
        ["mocov2", "2", "bbbb2222", "21.0 ± –", "22.0 ± –", "1", "0.0 (p –)"],
        ["concl", "2", "cccc3333", "**26.0 ± 1.4**", "**25.0 ± 1.4**", "2", f"+5.0 (p {p:.3f})"],
        ["random", "–", "rrrr0000", "15.0 ± –", "14.0 ± –", "1", "–"],
    ]
    assert "paper's numbers do not apply" in demo
    assert "paper GlaS" not in demo and "published" not in demo
    for phrase in ("sample standard deviation", "Mask R-CNN", "ResNet-18-FPN", "COCO AP",
                   "Welch", "vs mocov2"):  # fmt: skip
        assert phrase in md.split("## ")[0]


def test_csv_has_every_row_and_all_four_tests(built):
    csv = pd.read_csv(built.result.csv)
    assert len(csv) == 8 and list(csv["profile"].unique()) == ["paper", "demo"]
    concl = csv[csv["config_hash"] == PAPER_CONCL[3]].iloc[0]
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    for ds, metric, i in (("glas", "segm_AP", 1), ("crag", "segm_AP", 1)):
        t, p = welch_by_hand(values(PAPER_CONCL, ds, i), values(base, ds, i))
        assert concl[f"{ds}_{metric}_t"] == pytest.approx(t, rel=1e-5)
        assert concl[f"{ds}_{metric}_p"] == pytest.approx(p, rel=1e-5)
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
