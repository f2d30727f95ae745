"""Every results table the suite writes: the row ``make benchmark`` prints, and the report's
``results.md`` sections and ``results.csv``.

One set of cell and column formats for all of them: mean ± sample std (the row ``make
benchmark`` prints) or mean [95 % CI] (the report) with one decimal, ``–`` where there is
nothing to show (the spread of one seed, a missing value), and columns named ``GlaS AP_bb``,
``CRAG AP_mk``, ``Tissue k-NN bAcc``, …
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.core.schema import (
    DATASET_TITLES,
    DATASETS,
    PROBE_HEADLINE,
    PROBE_TITLES,
    PROBES,
    TABLE_METRICS,
)
from benchmark.report.runs import COMPARISON_STATS, DEFAULT_DELTA, KEYS

DASH = "–"


def column(dataset: str, metric: str) -> str:
    """The column of one dataset and metric: ``GlaS AP_bb``."""
    return f"{DATASET_TITLES[dataset]} {TABLE_METRICS[metric]}"


def probe_column(dataset: str, probe: str, metric: str) -> str:
    """The column of one probe metric: ``Tissue k-NN bAcc``, ``GlaS dense Dice``."""
    return " ".join(PROBE_TITLES[k] for k in (dataset, probe, metric))


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
    which has none), then the number of seeds. Where the summary holds the probes' headline
    metrics (``tissue_knn_balanced_accuracy_mean``, …) they follow the AP columns, likewise."""
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
    probe_counts = []
    for (ds, probe), metric in PROBE_HEADLINE.items():
        key = f"{ds}_{probe}_{metric}"
        if f"{key}_mean" not in summary:
            continue
        n = int(summary.get(f"{ds}_{probe}_seeds", 0))
        head.append(probe_column(ds, probe, metric))
        row.append(mean_std(summary[f"{key}_mean"], summary.get(f"{key}_std") if n > 1 else None))
        probe_counts.append(f"{n} {probe_column(ds, probe, metric).rsplit(' ', 1)[0]}")
    note = f"(COCO AP, mean ± sample std over {', '.join(counts)}"
    if probe_counts:
        note += f"; probes in %, mean ± sample std over seeds: {', '.join(probe_counts)}"
    return markdown_table(head, [row]) + "\n" + note + ")"


def csv_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """``results.csv``: the summary without helper columns, keys first."""
    keep = [*KEYS, "baseline_config"]
    for ds in DATASETS:
        keep.append(f"{ds}_n")
        for m in TABLE_METRICS:
            stats = ("mean", "std", "ci_low", "ci_high", "best", *COMPARISON_STATS)
            keep += [f"{ds}_{m}_{s}" for s in stats]
        keep += [f"{ds}_bbox_AP_paper", f"{ds}_bbox_AP_paper_delta"]
    return summary[keep]


def probe_csv_frame(probes: pd.DataFrame) -> pd.DataFrame:
    """``probes.csv``: one row per benchmark config with probe runs, keys first, then per
    (dataset, probe) its seeds and per metric the statistics of ``probe_summary``."""
    keep = [*KEYS, "baseline_config"]
    for (ds, probe), metrics in PROBES.items():
        keep.append(f"{ds}_{probe}_n")
        for m in metrics:
            stats = ("mean", "std", "ci_low", "ci_high", "ci_kind", *COMPARISON_STATS)
            keep += [f"{ds}_{probe}_{m}_{s}" for s in stats]
    return probes.reindex(columns=keep)


# ---------------------------------------------------------------------------- results.md


def _signed(x: float) -> str:
    """``+1.2`` / ``-1.2``, and ``0.0`` rather than ``-0.0`` for what rounds to zero."""
    return "0.0" if round(x, 1) == 0 else f"{x:+.1f}"


def _p_text(p: float) -> str:
    return DASH if _missing(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def mean_ci(mean: float, low: float, high: float) -> str:
    """``58.0 [56.5, 59.8]``; ``53.0 [–]`` without an interval (one seed)."""
    if _missing(mean):
        return DASH
    if _missing(low) or _missing(high):
        return f"{mean:.1f} [{DASH}]"
    return f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _cell(row: pd.Series, ds: str, m: str) -> str:
    mean = row[f"{ds}_{m}_mean"]
    if pd.isna(mean):
        return DASH
    text = mean_ci(mean, row[f"{ds}_{m}_ci_low"], row[f"{ds}_{m}_ci_high"])
    return f"**{text}**" if row[f"{ds}_{m}_best"] else text


def _delta_cell(row: pd.Series, ds: str, m: str) -> str:
    delta = row[f"{ds}_{m}_delta"]
    if pd.isna(delta):
        return DASH
    return f"{_signed(delta)} (p {_p_text(row[f'{ds}_{m}_p_holm'])})"


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
    head += [f"Δ {column(ds, 'bbox_AP')} vs {baseline} (Holm p)" for ds in datasets]
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


def _verdict(resolved: Any, p_holm: Any) -> str:
    """``resolved`` / ``not resolved`` from the interval; ``resolved†`` where the interval
    excludes 0 but Holm's p does not reach 0.05, which with 2–3 seeds is common (their
    percentile interval spans only the observed differences): a hint to add seeds."""
    if _missing(resolved):
        return DASH
    if not bool(resolved):
        return "not resolved"
    return "resolved†" if _missing(p_holm) or p_holm >= 0.05 else "resolved"


def _test_cell(row: pd.Series, prefix: str) -> str:
    test = row[f"{prefix}_test"]
    if _missing(test):
        return f"{DASH} (1 seed)"
    return f"paired, {int(row[f'{prefix}_pairs'])} seeds" if test == "paired" else "Welch"


def _seeds_cell(n: Any) -> str:
    return DASH if _missing(n) else str(int(n))


def comparison_table(
    rows: pd.DataFrame, baseline: str, items: Sequence[tuple[str, str]], delta: float
) -> str:
    """One line per compared row and ``(prefix, title)`` of ``items``: Δ with its 95 % CI,
    the test and its p, Holm's p, whether the interval excludes 0, the minimum detectable
    difference and the seeds per row that would resolve ``delta``; then the rows that had
    nothing to compare with. Empty when no row compares."""
    with_config = rows.duplicated(["method", "epochs"], keep=False).any()
    head = ["method", "pre-training epochs"] + (["config"] if with_config else [])
    head += [
        "metric", f"Δ vs {baseline} [95 % CI]", "test", "p", "Holm p", "verdict", "MDD",
        f"seeds for Δ = {delta:g}",
    ]  # fmt: skip
    body, alone = [], []
    for _, row in rows.iterrows():
        name = [row["method"], DASH if pd.isna(row["epochs"]) else str(row["epochs"])]
        name += [row["config"]] if with_config else []
        lines = [
            [
                *name,
                title,
                f"{_signed(row[f'{prefix}_delta'])} "
                + (
                    f"[{DASH}]"
                    if _missing(row[f"{prefix}_delta_ci_low"])
                    else f"[{_signed(row[f'{prefix}_delta_ci_low'])}, "
                    f"{_signed(row[f'{prefix}_delta_ci_high'])}]"
                ),
                _test_cell(row, prefix),
                _p_text(row[f"{prefix}_p"]),
                _p_text(row[f"{prefix}_p_holm"]),
                _verdict(row[f"{prefix}_resolved"], row[f"{prefix}_p_holm"]),
                DASH if _missing(row[f"{prefix}_mdd"]) else f"{row[f'{prefix}_mdd']:.1f}",
                _seeds_cell(row[f"{prefix}_seeds_needed"]),
            ]
            for prefix, title in items
            if not _missing(row[f"{prefix}_delta"])
        ]
        body += lines
        if not lines and row["method"] != baseline:
            alone.append(" ".join(name[:1] + ([f"{name[1]} ep"] if name[1] != DASH else [])))
    if not body:
        return ""
    text = markdown_table(head, body)
    if any(line[-3] == "resolved†" for line in body):
        text += (
            "\n\nresolved†: the 95 % interval excludes 0 but Holm's p is ≥ 0.05: with this few "
            "seeds the bootstrap interval is too narrow to trust alone; run more seeds."
        )
    if alone:
        text += (
            f"\n\nNot compared (no {baseline} row with the same profile and pre-training epochs, "
            f"or no shared dataset): {', '.join(alone)}."
        )
    return text


COMPARISON_NOTE = (
    "Δ: the row minus {baseline} at the same profile and pre-training epochs. Where both rows "
    "have runs with the same seed numbers (at least two), the seeds pair: Δ is the mean paired "
    "difference over those seeds, its interval the bootstrap of that mean, the test the paired "
    "t-test (scipy.stats.ttest_rel); otherwise Δ is the difference of the means, its interval "
    "the bootstrap of that difference and the test Welch's (ttest_ind, equal_var=False). Holm p: "
    "Holm's correction over the methods compared in one profile, budget, dataset and metric. "
    "*resolved*: the 95 % interval of Δ excludes 0; *not resolved*: it covers 0, so these seeds "
    "cannot tell the row from {baseline}. With 5 seeds or fewer the bootstrap interval is too "
    "narrow: read it with the p beside it. MDD: the smallest |Δ| a two-sided test at α = 0.05 "
    "detects with power 0.8 at the observed spread and these seeds (paired t with the pairs, "
    "else two-sample t); seeds for Δ = {delta:g}: the seeds per row that would detect a "
    "difference of {delta:g} points with that power. See docs/statistics.md."
)


SECTION_NOTES = {
    "paper": (
        "Pre-training on NCT-CRC-HE-100K with the paper's recipe, fine-tuning on the GlaS and "
        "CRAG releases: these rows are comparable with the published numbers."
    ),
    "cpu": (
        "The CPU study profile: the demo's synthetic data and budgets with 3 seeds per "
        "detector and probe, so that intervals and paired tests can resolve differences. "
        "The ranking is one of methods on the suite's synthetic histology, not on pathology."
    ),
    "demo": (
        "Synthetic H&E-like images generated by the suite, tiny budgets on the CPU. These "
        "rows show that the pipeline runs end to end; they measure nothing about pathology, "
        "and the paper's numbers do not apply to them."
    ),
}


def probe_items(probes: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(dataset, probe, metric, column) of every probe metric with results in ``probes``."""
    return [
        (ds, probe, m, probe_column(ds, probe, m))
        for (ds, probe), metrics in PROBES.items()
        for m in metrics
        if f"{ds}_{probe}_{m}_mean" in probes and probes[f"{ds}_{probe}_{m}_mean"].notna().any()
    ]


def probe_table(rows: pd.DataFrame) -> str:
    """The probe metrics of one profile's rows as mean [95 % CI], with seeds per probe."""
    items = probe_items(rows)
    with_config = rows.duplicated(["method", "epochs"], keep=False).any()
    head = ["method", "pre-training epochs"] + (["config"] if with_config else [])
    shown = list(dict.fromkeys((ds, probe) for ds, probe, _, _ in items))
    for ds, probe in shown:
        head += [title for d, p, _, title in items if (d, p) == (ds, probe)]
        head.append(f"{PROBE_TITLES[ds]} {PROBE_TITLES[probe]} n")
    body = []
    for _, row in rows.iterrows():
        cells = [row["method"], DASH if pd.isna(row["epochs"]) else str(row["epochs"])]
        cells += [row["config"]] if with_config else []
        for ds, probe in shown:
            for d, p, m, _ in items:
                if (d, p) == (ds, probe):
                    key = f"{ds}_{probe}_{m}"
                    cells.append(
                        mean_ci(row[f"{key}_mean"], row[f"{key}_ci_low"], row[f"{key}_ci_high"])
                    )
            cells.append(str(int(row[f"{ds}_{probe}_n"])))
        body.append(cells)
    return markdown_table(head, body)


PROBE_NOTE = (
    "Frozen pre-trained backbone, no fine-tuning: k-NN and linear classifiers of tissue "
    "patches (balanced accuracy bAcc and macro F1) and a linear dense gland probe on GlaS and "
    "CRAG (Dice and IoU, mean over test images), all in %. Each cell is the mean over probe "
    "seeds [95 % interval of a two-level bootstrap: seeds, then test images within each seed; "
    "over seeds only where a run's per-image results are missing]. probes.csv has every "
    "number."
)


def markdown_report(
    summary: pd.DataFrame,
    baseline: str,
    source: str,
    figures: Mapping[str, Sequence[Path]] | None = None,
    probes: pd.DataFrame | None = None,
    delta: float = DEFAULT_DELTA,
) -> str:
    """``results.md``: a preamble that says what the numbers are, then one section per profile
    with its table, its comparison with ``baseline``, its probes (``probes``: the probe
    summary, when there is one) and its figures."""
    lines = [
        "# ConCL-Bench results",
        "",
        f"{source}",
        "",
        "Each cell is the mean over the n fine-tuning seeds of Mask R-CNN with a ResNet-18-FPN "
        "backbone initialised from the pre-trained weights, evaluated with COCO AP (%, IoU "
        "0.50:0.95) on the test split (AP_bb box AP, AP_mk mask AP), with its 95 % percentile "
        "bootstrap interval over seeds in brackets ([–] with one seed). results.csv also has the "
        "sample standard deviation (n − 1 in the denominator) of every cell.",
        "",
        f"Δ vs {baseline}: see each profile's comparison; the main tables show Δ with Holm's p, "
        f"– for {baseline} itself, without a {baseline} row at that budget, and p – when a side "
        "has a single seed. " + COMPARISON_NOTE.format(baseline=baseline, delta=delta),
    ]
    if not (summary["method"] == baseline).any():
        lines += ["", f"No {baseline} row in the store: nothing to compare with (all Δ are –)."]
    ap_items = [(f"{ds}_{m}", column(ds, m)) for ds in DATASETS for m in TABLE_METRICS]
    profiles = list(dict.fromkeys(summary["profile"]))
    if probes is not None and not probes.empty:
        profiles += [p for p in dict.fromkeys(probes["profile"]) if p not in profiles]
    for profile in profiles:
        rows = summary[summary["profile"] == profile]
        with_paper = profile == "paper"
        lines += ["", f"## {profile.capitalize()} profile", ""]
        lines += [SECTION_NOTES.get(profile, f"Profile {profile!r}."), ""]
        if not rows.empty:
            lines += [section_table(rows, baseline, with_paper), ""]
            caption = (
                "*Bold: the best mean of the column among the methods with the same "
                "pre-training epochs (as in the paper's table; ties are all bold, a budget with "
                "one row is not marked). Pre-training epochs – : no pre-training (random init "
                "or external weights)."
            )
            if with_paper:
                caption += (
                    " paper: AP_bb published in the ConCL README (ECCV 2022), with our mean "
                    "minus it in brackets."
                )
            if rows.duplicated(["method", "epochs"], keep=False).any():
                caption += " config: the first digits of the config hash, one row per config."
            lines.append(caption + "*")
            compared = comparison_table(rows, baseline, ap_items, delta)
            if compared:
                lines += ["", f"### {profile.capitalize()}: fine-tuning vs {baseline}", ""]
                lines.append(compared)
        here = None if probes is None else probes[probes["profile"] == profile]
        if here is not None and not here.empty and probe_items(here):
            lines += ["", f"### {profile.capitalize()}: frozen-backbone probes", "", PROBE_NOTE]
            lines += ["", probe_table(here)]
            items = [(f"{d}_{p}_{m}", title) for d, p, m, title in probe_items(here)]
            compared = comparison_table(here, baseline, items, delta)
            if compared:
                lines += ["", f"### {profile.capitalize()}: probes vs {baseline}", ""]
                lines.append(compared)
        for path in (figures or {}).get(profile, []):
            lines += ["", f"![{path.stem}]({path.name})"]
    return "\n".join(lines) + "\n"
