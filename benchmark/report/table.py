"""Every results table the suite writes: the row ``make benchmark`` prints, and the report's
``results.md`` sections and ``results.csv``.

One set of cell and column formats for all of them: mean ± sample std with one decimal,
``–`` where there is nothing to show (the spread of one seed, a missing value), and columns
named ``GlaS AP_bb``, ``CRAG AP_mk``, …
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.core.schema import DATASET_TITLES, DATASETS, TABLE_METRICS
from benchmark.report.runs import KEYS

DASH = "–"


def column(dataset: str, metric: str) -> str:
    """The column of one dataset and metric: ``GlaS AP_bb``."""
    return f"{DATASET_TITLES[dataset]} {TABLE_METRICS[metric]}"


def _missing(x: Any) -> bool:
    return x is None or bool(pd.isna(x))


def mean_std(mean: float, std: float | None) -> str:
    """``52.0 ± 2.8``; ``52.0 ± –`` when there is no spread (``None`` or NaN: one seed)."""
    return f"{mean:.1f} ± {DASH if _missing(std) else f'{std:.1f}'}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def results_table(label: str, epochs: Any, summary: Mapping[str, float]) -> str:
    """The row ``make benchmark`` prints, in the paper's layout: AP_bb and AP_mk as mean ± std
    over seeds of ``pipeline.aggregate``'s ``summary`` (``–`` for the spread of one seed,
    which has none), then the number of seeds."""
    head = ["method", "epochs"]
    row = [label, str(epochs)]
    counts = []
    for ds in DATASETS:
        n = int(summary.get(f"{ds}_seeds", 0))
        for metric in TABLE_METRICS:
            key = f"{ds}_{metric}_mean"
            if key in summary:
                head.append(column(ds, metric))
                row.append(mean_std(summary[key], summary[f"{ds}_{metric}_std"] if n > 1 else None))
        if n:
            counts.append(f"{n} {DATASET_TITLES[ds]} seed{'s' if n != 1 else ''}")
    note = f"(COCO AP, mean ± sample std over {', '.join(counts)})"
    return markdown_table(head, [row]) + "\n" + note


def csv_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """``results.csv``: the summary without helper columns, keys first."""
    keep = [*KEYS, "baseline_config"]
    for ds in DATASETS:
        keep.append(f"{ds}_n")
        for m in TABLE_METRICS:
            keep += [f"{ds}_{m}_{s}" for s in ("mean", "std", "best", "delta", "t", "p")]
        keep += [f"{ds}_bbox_AP_paper", f"{ds}_bbox_AP_paper_delta"]
    return summary[keep]


# ---------------------------------------------------------------------------- results.md


def _signed(x: float) -> str:
    """``+1.2`` / ``-1.2``, and ``0.0`` rather than ``-0.0`` for what rounds to zero."""
    return "0.0" if round(x, 1) == 0 else f"{x:+.1f}"


def _cell(row: pd.Series, ds: str, m: str) -> str:
    mean = row[f"{ds}_{m}_mean"]
    if pd.isna(mean):
        return DASH
    text = mean_std(mean, row[f"{ds}_{m}_std"])
    return f"**{text}**" if row[f"{ds}_{m}_best"] else text


def _delta_cell(row: pd.Series, ds: str, m: str) -> str:
    delta, p = row[f"{ds}_{m}_delta"], row[f"{ds}_{m}_p"]
    if pd.isna(delta):
        return DASH
    p_text = DASH if pd.isna(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")
    return f"{_signed(delta)} (p {p_text})"


def _paper_cell(row: pd.Series, ds: str) -> str:
    paper, delta = row[f"{ds}_bbox_AP_paper"], row[f"{ds}_bbox_AP_paper_delta"]
    if pd.isna(paper):
        return DASH
    return f"{paper:.1f}" + ("" if pd.isna(delta) else f" ({_signed(delta)})")


def section_table(rows: pd.DataFrame, baseline: str, with_paper: bool) -> str:
    """The markdown table of one profile's rows (datasets without results are left out)."""
    datasets = [ds for ds in DATASETS if rows[f"{ds}_n"].sum() > 0]
    with_config = rows.duplicated(["method", "epochs"], keep=False).any()
    head = ["method", "pre-training epochs"] + (["config"] if with_config else [])
    for ds in datasets:
        head += [column(ds, m) for m in TABLE_METRICS] + [f"{DATASET_TITLES[ds]} n"]
    head += [f"Δ {column(ds, 'bbox_AP')} vs {baseline} (p)" for ds in datasets]
    if with_paper:
        head += [f"paper {column(ds, 'bbox_AP')} (ours − paper)" for ds in datasets]
    body = []
    for _, row in rows.iterrows():
        cells = [row["method"], DASH if pd.isna(row["epochs"]) else str(row["epochs"])]
        cells += [row["config"]] if with_config else []
        for ds in datasets:
            cells += [_cell(row, ds, m) for m in TABLE_METRICS] + [str(row[f"{ds}_n"])]
        cells += [_delta_cell(row, ds, "bbox_AP") for ds in datasets]
        cells += [_paper_cell(row, ds) for ds in datasets] if with_paper else []
        body.append(cells)
    return markdown_table(head, body)


SECTION_NOTES = {
    "paper": (
        "Pre-training on NCT-CRC-HE-100K with the paper's recipe, fine-tuning on the GlaS and "
        "CRAG releases: these rows are comparable with the published numbers."
    ),
    "demo": (
        "Synthetic H&E-like images generated by the suite, tiny budgets on the CPU. These "
        "rows show that the pipeline runs end to end; they measure nothing about pathology, "
        "and the paper's numbers do not apply to them."
    ),
}


def markdown_report(
    summary: pd.DataFrame,
    baseline: str,
    source: str,
    figures: Mapping[str, Sequence[Path]] | None = None,
) -> str:
    """``results.md``: a preamble that says what the numbers are, then one section per profile."""
    lines = [
        "# ConCL-Bench results",
        "",
        f"{source}",
        "",
        "Each cell is the mean ± sample standard deviation (n − 1 in the denominator) over the "
        "n fine-tuning seeds of Mask R-CNN with a ResNet-18-FPN backbone initialised from the "
        "pre-trained weights, evaluated with COCO AP (%, IoU 0.50:0.95) on the test split: "
        "AP_bb is box AP, AP_mk mask AP. With one seed the std is shown as –.",
        "",
        f"Δ vs {baseline}: difference of the means (method − {baseline}) at the same profile and "
        "pre-training epochs, with the two-sided p of Welch's unequal-variance t-test "
        "(scipy.stats.ttest_ind, equal_var=False) over the per-seed values; p is – when either "
        f"side has fewer than 2 seeds, and Δ is – for {baseline} itself or without a "
        f"{baseline} row at that budget. results.csv has Δ, t and p for AP_bb and AP_mk.",
    ]
    if not (summary["method"] == baseline).any():
        lines += ["", f"No {baseline} row in the store: nothing to compare with (all Δ are –)."]
    profiles = list(dict.fromkeys(summary["profile"]))
    for profile in profiles:
        rows = summary[summary["profile"] == profile]
        with_paper = profile == "paper"
        lines += ["", f"## {profile.capitalize()} profile", ""]
        lines += [SECTION_NOTES.get(profile, f"Profile {profile!r}."), ""]
        lines += [section_table(rows, baseline, with_paper), ""]
        caption = (
            "*Bold: the best mean of the column among the methods with the same pre-training "
            "epochs (as in the paper's table; ties are all bold, a budget with one row is not "
            "marked). Pre-training epochs – : no pre-training (random init or external weights)."
        )
        if with_paper:
            caption += (
                " paper: AP_bb published in the ConCL README (ECCV 2022), with our mean minus it "
                "in brackets."
            )
        if rows.duplicated(["method", "epochs"], keep=False).any():
            caption += " config: the first digits of the config hash, one row per config."
        lines.append(caption + "*")
        for path in (figures or {}).get(profile, []):
            lines += ["", f"![{path.stem}]({path.name})"]
    return "\n".join(lines) + "\n"
