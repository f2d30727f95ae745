"""The results report: every finished benchmark in the MLflow store as the paper's table.

``build_report`` reads the store (never the run folders, so it works on a copied
``mlflow.db``), writes ``results.md``/``results.csv`` and the figures, and logs them to a new
``stage=report`` run. The frames are built by pure functions (``seed_frame``,
``summary_table``, ``markdown_report``) so tests can check them on hand-made values.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from scipy import stats

from benchmark import tracking
from benchmark.config import ConfigError, experiments_dir
from benchmark.core.schema import DATASET_TITLES
from benchmark.tracking import PARENT_RUN_ID_TAG, Tracker

DATASETS = DATASET_TITLES
METRICS = {"bbox_AP": "AP_bb", "segm_AP": "AP_mk"}
#: Section order of ``results.md``; other profiles follow alphabetically.
PROFILES = ("paper", "demo")
#: Row order within a block: the paper's, then anything else alphabetically.
METHOD_ORDER = ("simclr", "byol", "pcl", "mocov1", "mocov2", "densecl", "concl")
#: Methods whose parents carry an ``epochs`` tag that means nothing (no pre-training).
NO_PRETRAINING = ("random",)
KEYS = ["profile", "method", "epochs", "config_hash"]
SEED_COLUMNS = [*KEYS, "dataset", "seed", *METRICS, "run_id", "parent_id", "pretrain_hash"]
PUBLISHED = Path("paper") / "published.csv"
DASH = "–"


@dataclass
class ReportResult:
    """What ``build_report`` wrote and the frames it wrote them from."""

    run_id: str
    markdown: Path
    csv: Path
    figures: list[Path]
    seeds: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)


def _tag(runs: pd.DataFrame, key: str) -> pd.Series:
    col = f"tags.{key}"
    return runs[col] if col in runs else pd.Series(None, index=runs.index, dtype=object)


def _metric(runs: pd.DataFrame, key: str) -> pd.Series:
    col = f"metrics.{key}"
    return runs[col] if col in runs else pd.Series(np.nan, index=runs.index)


def load_runs(client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """All active runs in ``mlflow.search_runs``'s layout (``run_id``, ``status``,
    ``start_time``, ``tags.*``, ``metrics.*``), without setting the global tracking URI."""
    rows: list[dict] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status}
            row["start_time"] = run.info.start_time
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run_id", "status", "start_time"])


def seed_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per FINISHED fine-tuning child of a benchmark parent: the per-seed values that
    every statistic of the report starts from. Tuning trials (a ``tune_study`` tag), report
    runs and pre-training children are not benchmark results and are left out."""
    if runs.empty:
        return pd.DataFrame(columns=SEED_COLUMNS)
    tuned = _tag(runs, "tune_study").fillna("").astype(str).str.strip() != ""
    parents = runs[(_tag(runs, "run_kind") == "benchmark") & ~tuned]
    method = _tag(parents, "method").astype(str)
    epochs = pd.to_numeric(_tag(parents, "epochs"), errors="coerce").astype("Int64")
    # random init and external weights: the config's epochs were never trained
    no_pretraining = (
        method.isin(NO_PRETRAINING)
        | method.str.startswith("weights-")
        | _tag(parents, "weights").notna()
    )
    parents = pd.DataFrame(
        {
            "parent_id": parents["run_id"],
            "profile": _tag(parents, "profile").fillna("unknown"),
            "method": method,
            "epochs": epochs.mask(no_pretraining),
            "config_hash": _tag(parents, "config_hash").fillna(""),
            "pretrain_hash": _tag(parents, "pretrain_hash"),
        }
    )
    kids = runs[(_tag(runs, "stage") == "finetune") & (runs["status"] == "FINISHED")]
    kids = pd.DataFrame(
        {
            "run_id": kids["run_id"],
            "parent_id": _tag(kids, PARENT_RUN_ID_TAG),
            "dataset": _tag(kids, "dataset"),
            "seed": pd.to_numeric(_tag(kids, "seed"), errors="coerce").astype("Int64"),
            **{m: _metric(kids, m) for m in METRICS},
        }
    )
    kids = kids[kids["dataset"].isin(list(DATASETS)) & kids[list(METRICS)].notna().any(axis=1)]
    out = kids.merge(parents, on="parent_id", how="inner")[SEED_COLUMNS]
    return _ordered(out, extra=["dataset", "seed"]).reset_index(drop=True)


def _ordered(frame: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Paper profile first, then epochs (no pre-training last), then the paper's method order."""
    profile_rank = {p: i for i, p in enumerate(PROFILES)}
    method_rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = frame.assign(
        _p=frame["profile"].map(profile_rank).fillna(len(PROFILES)),
        _e=frame["epochs"].astype("Float64").fillna(np.inf),
        _m=frame["method"].map(method_rank).fillna(len(METHOD_ORDER)),
    )
    order = ["_p", "profile", "_e", "_m", "method", "config_hash", *extra]
    return frame.loc[keys.sort_values(order, kind="stable").index]


def load_published(path: Path | None = None) -> pd.DataFrame:
    """The ConCL README's AP_bb table (method, epochs, glas_bbox_AP, crag_bbox_AP)."""
    return pd.read_csv(path or experiments_dir() / PUBLISHED)


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's t and two-sided p; NaN when a side has fewer than two seeds."""
    if len(a) < 2 or len(b) < 2:
        return np.nan, np.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def summary_table(
    seeds: pd.DataFrame, published: pd.DataFrame | None = None, baseline: str = "mocov2"
) -> pd.DataFrame:
    """One row per (profile, method, epochs, config hash): mean, sample std and n per dataset
    and metric; Welch's test against ``baseline`` at the same profile and epochs
    (``*_delta``, ``*_t``, ``*_p``); the best mean of each (profile, epochs) block
    (``*_best``); the published AP_bb and our difference to it, on paper rows only."""
    seeds = seeds.assign(row=seeds.groupby(KEYS, dropna=False, sort=False).ngroup())
    keys = seeds.drop_duplicates("row").set_index("row")[[*KEYS, "pretrain_hash"]]
    wide = seeds.groupby(["row", "dataset"])[list(METRICS)].agg(["mean", "std", "count"])
    wide = wide.unstack("dataset")
    wide.columns = [f"{ds}_{m}_{s}" for m, s, ds in wide.columns]
    out = keys.join(wide)
    for ds in DATASETS:
        out[f"{ds}_n"] = out.get(f"{ds}_bbox_AP_count", pd.Series(0, index=out.index))
        out[f"{ds}_n"] = out[f"{ds}_n"].fillna(0).astype(int)
        for m in METRICS:
            for s in ("mean", "std"):
                out[f"{ds}_{m}_{s}"] = out.get(f"{ds}_{m}_{s}", np.nan)
    out = out.drop(columns=[c for c in out if c.endswith("_count")])
    out["config"] = out["config_hash"].str[:8]
    # the name in figures: the config's digits only where one method has several configs
    clash = out.duplicated(["profile", "method", "epochs"], keep=False)
    out["label"] = out["method"].where(~clash, out["method"] + " [" + out["config"] + "]")
    block = [out["profile"], out["epochs"].astype("Float64").fillna(-1)]
    _compare(out, seeds, baseline, block)
    for ds in DATASETS:
        for m in METRICS:
            shown = out[f"{ds}_{m}_mean"].round(1)
            best = shown == shown.groupby(block).transform("max")
            out[f"{ds}_{m}_best"] = best & (shown.groupby(block).transform("count") >= 2)
    for ds in DATASETS:
        out[f"{ds}_bbox_AP_paper"] = np.nan
    if published is not None and not published.empty:
        paper = published.rename(
            columns={f"{ds}_bbox_AP": f"{ds}_bbox_AP_paper" for ds in DATASETS}
        )
        paper = paper.assign(epochs=paper["epochs"].astype("Int64"))
        paper = paper.drop_duplicates(["method", "epochs"], keep="last")
        cols = [c for c in paper if c.endswith("_paper")]
        match = out[["method", "epochs"]].merge(paper, on=["method", "epochs"], how="left")
        on_paper = (out["profile"] == "paper").to_numpy()
        for c in cols:
            out[c] = np.where(on_paper, match[c].to_numpy(dtype=float), np.nan)
    for ds in DATASETS:
        out[f"{ds}_bbox_AP_paper_delta"] = out[f"{ds}_bbox_AP_mean"] - out[f"{ds}_bbox_AP_paper"]
    return _ordered(out).reset_index(drop=True)


def _compare(out: pd.DataFrame, seeds: pd.DataFrame, baseline: str, block: list) -> None:
    """Fill ``*_delta/_t/_p`` (and ``baseline_config``) against the baseline of each block.

    A block with several baseline rows (config hashes) compares with the one with most
    seeds (the first in table order on a tie); ``baseline_config`` says which."""
    values = dict(list(seeds.groupby(["row", "dataset"])))
    n_total = out[[f"{ds}_n" for ds in DATASETS]].sum(axis=1)
    is_base = out["method"] == baseline
    ref: dict[tuple, int] = {}
    for row in n_total[is_base].sort_values(ascending=False, kind="stable").index:
        ref.setdefault((out.at[row, "profile"], block[1][row]), row)
    out["baseline_config"] = None
    for ds in DATASETS:
        for m in METRICS:
            for s in ("delta", "t", "p"):
                out[f"{ds}_{m}_{s}"] = np.nan
    for row in out.index:
        base = ref.get((out.at[row, "profile"], block[1][row]))
        if base is None or base == row:
            continue
        out.at[row, "baseline_config"] = out.at[base, "config_hash"]
        for ds in DATASETS:
            a, b = values.get((row, ds)), values.get((base, ds))
            if a is None or b is None:
                continue
            for m in METRICS:
                x, y = a[m].dropna().to_numpy(), b[m].dropna().to_numpy()
                if len(x) and len(y):
                    out.at[row, f"{ds}_{m}_delta"] = x.mean() - y.mean()
                out.at[row, f"{ds}_{m}_t"], out.at[row, f"{ds}_{m}_p"] = _welch(x, y)


def csv_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary without helper columns, keys first."""
    keep = [*KEYS, "baseline_config"]
    for ds in DATASETS:
        keep.append(f"{ds}_n")
        for m in METRICS:
            keep += [f"{ds}_{m}_{s}" for s in ("mean", "std", "best", "delta", "t", "p")]
        keep += [f"{ds}_bbox_AP_paper", f"{ds}_bbox_AP_paper_delta"]
    return summary[keep]


# ---------------------------------------------------------------------------- markdown


def _num(x: float, fmt: str = ".1f") -> str:
    return DASH if pd.isna(x) else format(x, fmt)


def _signed(x: float) -> str:
    """``+1.2`` / ``-1.2``, and ``0.0`` rather than ``-0.0`` for what rounds to zero."""
    return "0.0" if round(x, 1) == 0 else f"{x:+.1f}"


def _cell(row: pd.Series, ds: str, m: str) -> str:
    mean, std = row[f"{ds}_{m}_mean"], row[f"{ds}_{m}_std"]
    if pd.isna(mean):
        return DASH
    text = f"{mean:.1f} ± {_num(std)}"
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
        head += [f"{DATASETS[ds]} {short}" for short in METRICS.values()] + [f"{DATASETS[ds]} n"]
    head += [f"Δ {DATASETS[ds]} AP_bb vs {baseline} (p)" for ds in datasets]
    if with_paper:
        head += [f"paper {DATASETS[ds]} AP_bb (ours − paper)" for ds in datasets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in rows.iterrows():
        cells = [row["method"], DASH if pd.isna(row["epochs"]) else str(row["epochs"])]
        cells += [row["config"]] if with_config else []
        for ds in datasets:
            cells += [_cell(row, ds, m) for m in METRICS] + [str(row[f"{ds}_n"])]
        cells += [_delta_cell(row, ds, "bbox_AP") for ds in datasets]
        cells += [_paper_cell(row, ds) for ds in datasets] if with_paper else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------- histories


def metric_curves(client: MlflowClient, run_ids: Iterable[str], key: str) -> pd.DataFrame:
    """``run_id, step, value`` of ``key``; a step logged twice (a resumed run repeats the
    steps after its checkpoint) keeps the later value."""
    rows = [
        (rid, m.step, m.timestamp, m.value)
        for rid in dict.fromkeys(run_ids)
        for m in client.get_metric_history(rid, key)
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "step", "timestamp", "value"])
    frame = frame.sort_values(["run_id", "step", "timestamp"], kind="stable")
    return frame.drop_duplicates(["run_id", "step"], keep="last").drop(columns="timestamp")


def pretrain_runs(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.Series:
    """The pre-training child of each summary row (by method and pre-training hash, since a
    benchmark that reuses a finished pre-training has none of its own); finished ones first."""
    pre = runs[_tag(runs, "stage") == "pretrain"]
    pre = pre.assign(
        _done=pre["status"] == "FINISHED",
        method=_tag(pre, "method"),
        pretrain_hash=_tag(pre, "pretrain_hash"),
    ).sort_values(["_done", "start_time"], ascending=False)
    first = pre.drop_duplicates(["method", "pretrain_hash"])
    lookup = first.set_index(["method", "pretrain_hash"])["run_id"]
    found = [
        lookup.get((m, h)) if not pd.isna(e) else None
        for m, h, e in zip(
            summary["method"], summary["pretrain_hash"], summary["epochs"], strict=True
        )
    ]
    return pd.Series(found, index=summary.index, dtype=object)


# ---------------------------------------------------------------------------- report


def build_report(
    tracking_uri: str | None,
    experiment: str,
    out_dir: Path,
    baseline: str = "mocov2",
    published: Path | None = None,
) -> ReportResult:
    """Tables and figures of every finished benchmark in ``experiment``, logged to a new
    ``stage=report`` run. ``MLFLOW_TRACKING_URI`` wins over ``tracking_uri``, as in the rest
    of the suite. Nothing is written when the store holds no finished benchmark."""
    from benchmark import figures

    uri = tracking.tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = load_runs(client, found.experiment_id) if found is not None else pd.DataFrame()
    seeds = seed_frame(runs)
    if seeds.empty:
        raise ConfigError(
            f"no finished benchmark runs in experiment {experiment!r} at {uri}; "
            "run `make benchmark` first"
        )
    summary = summary_table(seeds, load_published(published), baseline)
    pre_ids = pretrain_runs(runs, summary)
    pre_curves = metric_curves(client, pre_ids.dropna(), "loss")
    pre_curves = pre_curves.merge(summary.assign(run_id=pre_ids)[["run_id", *KEYS]], on="run_id")
    ft_curves = metric_curves(client, seeds["run_id"], "train_loss").merge(
        seeds[["run_id", *KEYS, "dataset", "seed"]], on="run_id"
    )

    tracker = Tracker(experiment, uri)
    now = datetime.now().astimezone()
    run = tracker.client.create_run(
        tracker.experiment_id,
        tags={"stage": "report", "run_kind": "report", "baseline": baseline},
        run_name=f"report {now:%Y-%m-%d %H:%M}",
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[Path]] = {}
        for profile in dict.fromkeys(summary["profile"]):
            written[profile] = figures.write_figures(
                profile,
                seeds[seeds["profile"] == profile],
                summary[summary["profile"] == profile],
                pre_curves[pre_curves["profile"] == profile],
                ft_curves[ft_curves["profile"] == profile],
                out_dir,
            )
        source = (
            f"Generated {now:%Y-%m-%d %H:%M %Z} from MLflow experiment `{experiment}` at "
            f"`{uri}` ({len(seeds)} finished fine-tuning runs); logged as artifacts of run "
            f"`{run_id}`."
        )
        md = out_dir / "results.md"
        md.write_text(markdown_report(summary, baseline, source, written))
        csv = out_dir / "results.csv"
        csv_frame(summary).to_csv(csv, index=False, float_format="%.6g")
        paths = [p for ps in written.values() for p in ps]
        for path in [md, csv, *paths]:
            tracker.log_artifact(run_id, path)
        tracker.log_params(run_id, {"baseline": baseline, "rows": len(summary)})
        status = "FINISHED"
    finally:
        tracker.finish(run_id, status)
    return ReportResult(run_id, md, csv, paths, seeds, summary)
