"""Figures of the results report: one set of PNGs per data profile.

Each figure is meant to be read without the table: the title says what is plotted and over
what, the axes carry units, the legend names every mark. Drawn on ``matplotlib.figure.Figure``
(no pyplot state, no window), so a report never depends on a display or a backend setting.
Colour = method (the same in every figure); line style = pre-training budget; marker =
config, where one method has several configs at one budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

from benchmark.core.schema import (
    DATASET_TITLES,
    DATASETS,
    PROBE_HEADLINE,
    PROBE_TITLES,
    TABLE_METRICS,
)
from benchmark.report.runs import KEYS, METHOD_ORDER

#: Panel titles of the table's metrics.
METRIC_NAMES = {
    "bbox_AP": f"box AP ({TABLE_METRICS['bbox_AP']})",
    "segm_AP": f"mask AP ({TABLE_METRICS['segm_AP']})",
}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
DPI = 120


def method_color(method: str) -> str:
    """A colour per method that is the same in every figure and every report."""
    if method in METHOD_ORDER:
        return f"C{METHOD_ORDER.index(method)}"
    if method == "random":
        return "0.45"
    if method == "supervised":
        return "0.1"
    return f"C{7 + sum(map(ord, method)) % 3}"


def row_keys(frame: pd.DataFrame) -> pd.Series:
    """One string per benchmark row (profile, method, epochs, config hash), NA-safe."""
    parts = [
        (pd.to_numeric(frame[k]).astype("Int64") if k == "epochs" else frame[k])
        .astype("string")
        .fillna("-")
        for k in KEYS
    ]
    return parts[0].str.cat(parts[1:], sep="|")


def _budgets(summary: pd.DataFrame) -> list[int]:
    return sorted(int(e) for e in summary["epochs"].dropna().unique())


def _datasets(summary: pd.DataFrame) -> list[str]:
    return [ds for ds in DATASETS if summary[f"{ds}_n"].sum() > 0]


def _row_name(row: pd.Series, with_epochs: bool = True) -> str:
    if pd.isna(row["epochs"]):
        return f"{row['label']} (no pre-training)"
    return f"{row['label']}, {row['epochs']} ep" if with_epochs else row["label"]


def _styles(summary: pd.DataFrame) -> pd.DataFrame:
    """Colour, line style and marker of every summary row, indexed by ``row_keys``."""
    budgets = _budgets(summary)
    variant = summary.groupby(["method", "epochs"], dropna=False, sort=False).cumcount()
    return pd.DataFrame(
        {
            "color": [method_color(m) for m in summary["method"]],
            "ls": [
                "--" if pd.isna(e) else LINESTYLES[budgets.index(int(e)) % len(LINESTYLES)]
                for e in summary["epochs"]
            ],
            "marker": [MARKERS[v % len(MARKERS)] for v in variant],
            "label": [_row_name(row) for _, row in summary.iterrows()],
        },
    ).set_axis(row_keys(summary).to_numpy())


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _legend(fig: Figure, handles: list, labels: list[str]) -> None:
    seen = dict(zip(labels, handles, strict=True))
    fig.legend(
        seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.0, 0.93), frameon=False
    )


def ap_vs_epochs(summary: pd.DataFrame, profile: str, path: Path) -> Path:
    """AP per method against the pre-training budget, error bars = sample std over seeds;
    rows without pre-training are horizontal reference lines."""
    datasets, budgets = _datasets(summary), _budgets(summary)
    styles = _styles(summary)
    pos = {e: i for i, e in enumerate(budgets)}
    trained = summary[summary["epochs"].notna()]
    labels = list(dict.fromkeys(trained["label"]))
    width = 0.5 / max(len(labels), 1)
    fig = Figure(figsize=(11, 3.4 * len(datasets) + 0.8), layout="constrained")
    axes = fig.subplots(len(datasets), len(TABLE_METRICS), squeeze=False, sharex=True)
    for r, ds in enumerate(datasets):
        for c, m in enumerate(TABLE_METRICS):
            ax = axes[r, c]
            for i, label in enumerate(labels):
                rows = trained[trained["label"] == label].sort_values("epochs")
                style = styles.loc[row_keys(rows).iloc[0]]
                shift = (i - (len(labels) - 1) / 2) * width
                x = np.array([pos[int(e)] for e in rows["epochs"]]) + shift
                ax.errorbar(
                    x,
                    rows[f"{ds}_{m}_mean"],
                    yerr=rows[f"{ds}_{m}_std"].fillna(0),
                    color=style["color"],
                    marker=style["marker"],
                    ms=5,
                    capsize=3,
                    lw=1.3,
                    label=label,
                )
                if profile == "paper" and m == "bbox_AP":
                    ax.plot(
                        x,
                        rows[f"{ds}_bbox_AP_paper"],
                        color=style["color"],
                        marker="D",
                        mfc="none",
                        ls=":",
                        lw=1,
                        label="_nolegend_",
                    )
            for key, row in zip(row_keys(summary), summary.itertuples(), strict=True):
                if pd.isna(row.epochs):
                    ax.axhline(
                        getattr(row, f"{ds}_{m}_mean"),
                        color=styles.at[key, "color"],
                        ls="--",
                        lw=1.2,
                        label=styles.at[key, "label"],
                    )
            ax.set_title(f"{DATASET_TITLES[ds]}: {METRIC_NAMES[m]}")
            ax.set_ylabel("COCO AP (%)")
            ax.set_xticks(range(len(budgets)), [str(e) for e in budgets])
            ax.set_xlim(-0.5, max(len(budgets), 1) - 0.5)
            ax.margins(y=0.08)
            ax.grid(axis="y", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("pre-training epochs")
    handles, names = axes[0, 0].get_legend_handles_labels()
    rank = {name: i for i, name in enumerate([*labels, *styles["label"]])}
    pairs = sorted(zip(handles, names, strict=True), key=lambda hn: rank.get(hn[1], len(rank)))
    handles, names = [h for h, _ in pairs], [n for _, n in pairs]
    if profile == "paper":
        handles.append(Line2D([], [], color="0.3", marker="D", mfc="none", ls=":"))
        names.append("published (ConCL README), AP_bb")
    _legend(fig, handles, names)
    fig.suptitle(
        f"{profile.capitalize()} profile: fine-tuned Mask R-CNN AP vs pre-training epochs\n"
        "mean over fine-tuning seeds, error bar = sample std (none with one seed)"
    )
    return _save(fig, path)


def _block_labels(ax: Axes, summary: pd.DataFrame) -> None:
    """Separators and names of the pre-training budgets along a categorical x axis."""
    budget = summary["epochs"].astype("Float64").fillna(-1).to_numpy()
    starts = [0] + [i for i in range(1, len(budget)) if budget[i] != budget[i - 1]]
    for start, end in zip(starts, [*starts[1:], len(budget)], strict=True):
        if start:
            ax.axvline(start - 0.5, color="0.6", lw=0.8)
        e = summary["epochs"].iloc[start]
        name = (
            ("no pre-\ntraining" if end - start == 1 else "no pre-training")
            if pd.isna(e)
            else f"{e} epochs"
        )
        ax.text(
            start - 0.4,
            0.97,
            name,
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color="0.35",
        )
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.18 * (hi - lo))  # room for the names above the highest dot


def seed_points(seeds: pd.DataFrame, summary: pd.DataFrame, profile: str, path: Path) -> Path:
    """Every seed's AP as a dot (side by side) per benchmark row, with the row's mean as a bar;
    one panel per dataset and metric, stacked so that many rows stay legible."""
    datasets = _datasets(summary)
    n = len(summary)
    cat = pd.Series(range(n), index=row_keys(summary).to_numpy())
    points = seeds.assign(_cat=row_keys(seeds).map(cat).to_numpy()).dropna(subset="_cat")
    # seeds side by side, centred on the mean bar (none of them hidden under it twice)
    group = points.groupby(["_cat", "dataset"])
    k, rank = group["seed"].transform("size"), group.cumcount()
    jitter = ((rank - (k - 1) / 2) * np.minimum(0.3 / (k - 1).clip(lower=1), 0.08)).to_numpy()
    panels = [(ds, m) for ds in datasets for m in TABLE_METRICS]
    fig = Figure(figsize=(max(7.0, 0.5 * n + 2.5), 2.5 * len(panels) + 1.2), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (ds, m) in zip(axes, panels, strict=True):
        here = (points["dataset"] == ds).to_numpy()
        sub = points[here]
        ax.scatter(
            range(n), summary[f"{ds}_{m}_mean"], marker="_", s=400, color="black", lw=2, zorder=2
        )
        colors = [method_color(x) for x in sub["method"]]
        ax.scatter(sub["_cat"] + jitter[here], sub[m], c=colors, s=24, alpha=0.85, lw=0, zorder=3)
        ax.set_title(f"{DATASET_TITLES[ds]}: {METRIC_NAMES[m]}")
        ax.set_ylabel("COCO AP (%)")
        ax.grid(axis="y", alpha=0.3)
        _block_labels(ax, summary)
    rotate = n > 8
    axes[-1].set_xticks(
        range(n), summary["label"], rotation=45 if rotate else 0, ha="right" if rotate else "center"
    )
    axes[-1].set_xlim(-0.6, n - 0.4)
    axes[-1].set_xlabel("method, grouped by pre-training epochs")
    handles = [
        Line2D([], [], marker="o", ls="", color="0.4", label="one fine-tuning seed"),
        Line2D([], [], marker="_", ls="", ms=16, mew=2, color="black", label="mean over seeds"),
    ]
    _legend(fig, handles, [h.get_label() for h in handles])
    fig.suptitle(
        f"{profile.capitalize()} profile: AP of every fine-tuning seed\n"
        "dots = seeds (side by side so they do not overlap), bar = mean; colour = method"
    )
    return _save(fig, path)


def _plot_curve(ax: Axes, run: pd.DataFrame, style: pd.Series, label: str, ls: str) -> None:
    run = run.sort_values("step")
    few = len(run) <= 25
    ax.plot(
        run["step"],
        run["value"],
        color=style["color"],
        ls=ls,
        marker=style["marker"] if few or style["marker"] != "o" else None,
        markevery=1 if few else max(1, len(run) // 8),
        ms=4,
        lw=1.4,
        label=label,
    )


def pretrain_loss(curves: pd.DataFrame, summary: pd.DataFrame, profile: str, path: Path) -> Path:
    """Each pre-training's epoch-mean loss on one axes; shapes compare, levels do not."""
    styles = _styles(summary)
    by_row = dict(list(curves.groupby(row_keys(curves).to_numpy())))
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for key, style in styles.iterrows():
        if key in by_row:
            _plot_curve(ax, by_row[key], style, style["label"], style["ls"])
    positive = bool((curves["value"] > 0).all())
    if positive:  # log axis with plain numbers at 1-2-5 steps, readable without 10^k
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pre-training epoch")
    scale = ", log scale)" if positive else ")"
    ax.set_ylabel("training loss, epoch mean\n(each method's own objective" + scale)
    ax.grid(alpha=0.3, which="both")
    _legend(fig, *ax.get_legend_handles_labels())
    fig.suptitle(
        f"{profile.capitalize()} profile: pre-training loss of every method\n"
        "losses are different objectives on different scales: compare shapes, not levels"
    )
    return _save(fig, path)


def finetune_loss(curves: pd.DataFrame, summary: pd.DataFrame, profile: str, path: Path) -> Path:
    """Fine-tuning loss per iteration, mean over seeds: panels per dataset and pre-training
    budget, backbones without pre-training drawn in every panel as the reference."""
    styles = _styles(summary)
    datasets, budgets = _datasets(summary), _budgets(summary)
    columns: list[int | None] = [*budgets] or [None]
    curves = curves.assign(_row=row_keys(curves).to_numpy())
    mean = curves.groupby(["_row", "dataset", "step"])["value"].mean().reset_index()
    by_row = dict(list(mean.groupby(["_row", "dataset"])))
    names = {
        k: _row_name(row, with_epochs=False)
        for k, (_, row) in zip(styles.index, summary.iterrows(), strict=True)
    }
    fig = Figure(figsize=(4.6 * len(columns) + 2, 3.4 * len(datasets) + 1), layout="constrained")
    axes = fig.subplots(len(datasets), len(columns), squeeze=False, sharex="row", sharey="row")
    for r, ds in enumerate(datasets):
        for c, budget in enumerate(columns):
            ax = axes[r, c]
            for (key, style), e in zip(styles.iterrows(), summary["epochs"], strict=True):
                if (key, ds) in by_row and (pd.isna(e) or e == budget):
                    _plot_curve(ax, by_row[key, ds], style, names[key], "--" if pd.isna(e) else "-")
            title = "no pre-training" if budget is None else f"pre-trained {budget} epochs"
            ax.set_title(f"{DATASET_TITLES[ds]}, {title}")
            ax.set_xlabel("fine-tuning iteration")
            ax.grid(alpha=0.3)
        axes[r, 0].set_ylabel("training loss\n(Mask R-CNN total, mean over seeds)")
    order = list(names.values())
    pairs = [hl for ax in axes.flat for hl in zip(*ax.get_legend_handles_labels(), strict=True)]
    pairs.sort(key=lambda hl: order.index(hl[1]))
    _legend(fig, [h for h, _ in pairs], [lab for _, lab in pairs])
    fig.suptitle(
        f"{profile.capitalize()} profile: fine-tuning loss (sum of the RPN and RoI-head losses) "
        "per iteration, mean over seeds"
    )
    return _save(fig, path)


def _probe_panels(probe_sum: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The (dataset, probe, headline metric) with results, in ``PROBE_HEADLINE`` order."""
    keys = [(ds, probe, m, f"{ds}_{probe}_{m}_mean") for (ds, probe), m in PROBE_HEADLINE.items()]
    return [(ds, p, m) for ds, p, m, k in keys if k in probe_sum and probe_sum[k].notna().any()]


def _probe_title(ds: str, probe: str, m: str) -> str:
    return f"{PROBE_TITLES[ds]} {PROBE_TITLES[probe]} probe: {PROBE_TITLES[m]}"


def _ci_err(rows: pd.DataFrame, key: str) -> np.ndarray:
    """Asymmetric error bars (below, above the mean) of the 95 % interval; 0 without one."""
    mean = rows[f"{key}_mean"].to_numpy(float)
    low = (mean - rows[f"{key}_ci_low"].to_numpy(float)).clip(min=0)
    high = (rows[f"{key}_ci_high"].to_numpy(float) - mean).clip(min=0)
    return np.nan_to_num(np.vstack([low, high]))


def probe_points(probes: pd.DataFrame, probe_sum: pd.DataFrame, profile: str, path: Path) -> Path:
    """Each probe's headline metric per benchmark row: mean with its 95 % interval (seeds ×
    test images where the per-image results exist) and every probe seed as a dot."""
    panels = _probe_panels(probe_sum)
    n = len(probe_sum)
    cat = pd.Series(range(n), index=row_keys(probe_sum).to_numpy())
    points = probes.assign(_cat=row_keys(probes).map(cat).to_numpy()).dropna(subset="_cat")
    fig = Figure(figsize=(max(7.0, 0.5 * n + 2.5), 2.5 * len(panels) + 1.2), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (ds, probe, m) in zip(axes, panels, strict=True):
        key = f"{ds}_{probe}_{m}"
        colors = [method_color(x) for x in probe_sum["method"]]
        for x, (mean, err, color) in enumerate(
            zip(probe_sum[f"{key}_mean"], _ci_err(probe_sum, key).T, colors, strict=True)
        ):
            ax.errorbar(
                [x], [mean], yerr=err.reshape(2, 1), color=color, marker="_", ms=16, mew=2,
                capsize=4, lw=1.5, zorder=2,
            )  # fmt: skip
        sub = points[(points["dataset"] == ds) & (points["probe"] == probe)].dropna(subset=[m])
        group = sub.groupby("_cat")
        k, rank = group["seed"].transform("size"), group.cumcount()
        jitter = ((rank - (k - 1) / 2) * np.minimum(0.3 / (k - 1).clip(lower=1), 0.08)).to_numpy()
        ax.scatter(
            sub["_cat"] + 0.18 + jitter, sub[m], c=[method_color(x) for x in sub["method"]],
            s=20, alpha=0.8, lw=0, zorder=3,
        )  # fmt: skip
        ax.set_title(_probe_title(ds, probe, m))
        ax.set_ylabel(f"{PROBE_TITLES[m]} (%)")
        ax.grid(axis="y", alpha=0.3)
        _block_labels(ax, probe_sum)
    rotate = n > 8
    ha = "right" if rotate else "center"
    axes[-1].set_xticks(range(n), probe_sum["label"], rotation=45 if rotate else 0, ha=ha)
    axes[-1].set_xlim(-0.6, n - 0.2)
    axes[-1].set_xlabel("method, grouped by pre-training epochs")
    handles = [
        Line2D([], [], marker="o", ls="", color="0.4", label="one probe seed"),
        Line2D([], [], marker="_", ms=16, mew=2, color="black", label="mean, 95 % CI"),
    ]
    _legend(fig, handles, [h.get_label() for h in handles])
    fig.suptitle(
        f"{profile.capitalize()} profile: frozen-backbone probes (headline metric)\n"
        "bar = mean over probe seeds with its 95 % bootstrap interval, dots = seeds; "
        "colour = method"
    )
    return _save(fig, path)


def probe_vs_epochs(probe_sum: pd.DataFrame, profile: str, path: Path) -> Path:
    """Each probe's headline metric against the pre-training budget, one line per method with
    95 % intervals; rows without pre-training are horizontal reference lines."""
    panels, budgets = _probe_panels(probe_sum), _budgets(probe_sum)
    styles = _styles(probe_sum)
    pos = {e: i for i, e in enumerate(budgets)}
    trained = probe_sum[probe_sum["epochs"].notna()]
    labels = list(dict.fromkeys(trained["label"]))
    width = 0.5 / max(len(labels), 1)
    cols = min(2, len(panels))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.5 * cols + 2, 3.4 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True).ravel()
    for ax, (ds, probe, m) in zip(axes, panels, strict=False):
        key = f"{ds}_{probe}_{m}"
        for i, label in enumerate(labels):
            rows = trained[trained["label"] == label].sort_values("epochs")
            style = styles.loc[row_keys(rows).iloc[0]]
            shift = (i - (len(labels) - 1) / 2) * width
            x = np.array([pos[int(e)] for e in rows["epochs"]]) + shift
            ax.errorbar(
                x, rows[f"{key}_mean"], yerr=_ci_err(rows, key), color=style["color"],
                marker=style["marker"], ms=5, capsize=3, lw=1.3, label=label,
            )  # fmt: skip
        for k, row in zip(row_keys(probe_sum), probe_sum.itertuples(), strict=True):
            if pd.isna(row.epochs):
                ax.axhline(
                    getattr(row, f"{key}_mean"), color=styles.at[k, "color"], ls="--", lw=1.2,
                    label=styles.at[k, "label"],
                )  # fmt: skip
        ax.set_title(_probe_title(ds, probe, m))
        ax.set_ylabel(f"{PROBE_TITLES[m]} (%)")
        ax.set_xticks(range(len(budgets)), [str(e) for e in budgets])
        ax.set_xlim(-0.5, max(len(budgets), 1) - 0.5)
        ax.set_xlabel("pre-training epochs")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    pairs = [hl for ax in axes for hl in zip(*ax.get_legend_handles_labels(), strict=True)]
    _legend(fig, [h for h, _ in pairs], [label for _, label in pairs])
    fig.suptitle(
        f"{profile.capitalize()} profile: frozen-backbone probes vs pre-training epochs\n"
        "mean over probe seeds, error bar = 95 % bootstrap interval"
    )
    return _save(fig, path)


def write_figures(
    profile: str,
    seeds: pd.DataFrame,
    summary: pd.DataFrame,
    pretrain_curves: pd.DataFrame,
    finetune_curves: pd.DataFrame,
    out_dir: Path,
    probes: pd.DataFrame | None = None,
    probe_sum: pd.DataFrame | None = None,
) -> list[Path]:
    """The figures of one profile under ``out_dir``; a figure without data is skipped (the
    probe figures without probe rows, the probe-vs-epochs one with fewer than two budgets)."""
    paths = [
        ap_vs_epochs(summary, profile, out_dir / f"ap_vs_epochs_{profile}.png"),
        seed_points(seeds, summary, profile, out_dir / f"seeds_{profile}.png"),
    ]
    if not pretrain_curves.empty:
        out = out_dir / f"pretrain_loss_{profile}.png"
        paths.append(pretrain_loss(pretrain_curves, summary, profile, out))
    if not finetune_curves.empty:
        out = out_dir / f"finetune_loss_{profile}.png"
        paths.append(finetune_loss(finetune_curves, summary, profile, out))
    if probes is not None and probe_sum is not None and _probe_panels(probe_sum):
        out = out_dir / f"probes_{profile}.png"
        paths.append(probe_points(probes, probe_sum, profile, out))
        if len(_budgets(probe_sum)) >= 2:
            out = out_dir / f"probes_vs_epochs_{profile}.png"
            paths.append(probe_vs_epochs(probe_sum, profile, out))
    return paths
