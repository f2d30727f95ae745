"""The report's statistics: per-seed values reduced to one row per benchmark config.

``summary_table`` is pure (frames in, frame out), so tests check it on hand-made values.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from benchmark.core.schema import DATASETS, TABLE_METRICS
from benchmark.report.runs import KEYS, ordered


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
    wide = seeds.groupby(["row", "dataset"])[list(TABLE_METRICS)].agg(["mean", "std", "count"])
    wide = wide.unstack("dataset")
    wide.columns = [f"{ds}_{m}_{s}" for m, s, ds in wide.columns]
    out = keys.join(wide)
    for ds in DATASETS:
        out[f"{ds}_n"] = out.get(f"{ds}_bbox_AP_count", pd.Series(0, index=out.index))
        out[f"{ds}_n"] = out[f"{ds}_n"].fillna(0).astype(int)
        for m in TABLE_METRICS:
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
        for m in TABLE_METRICS:
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
    return ordered(out).reset_index(drop=True)


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
        for m in TABLE_METRICS:
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
            for m in TABLE_METRICS:
                x, y = a[m].dropna().to_numpy(), b[m].dropna().to_numpy()
                if len(x) and len(y):
                    out.at[row, f"{ds}_{m}_delta"] = x.mean() - y.mean()
                out.at[row, f"{ds}_{m}_t"], out.at[row, f"{ds}_{m}_p"] = _welch(x, y)
