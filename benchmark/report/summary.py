"""The report's statistics: per-seed values reduced to one row per benchmark config.

``summary_table`` (fine-tuning) and ``probe_summary`` (frozen-backbone probes) are pure
(frames in, frame out), so tests check them on hand-made values; the inference itself is in
``statistics``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from benchmark.core.schema import DATASETS, PROBES, TABLE_METRICS
from benchmark.report.runs import COMPARISON_STATS, DEFAULT_DELTA, KEYS, NO_PRETRAINING, ordered
from benchmark.report.statistics import Interval, bootstrap_ci, compare, hierarchical_ci, holm


def summary_table(
    seeds: pd.DataFrame,
    published: pd.DataFrame | None = None,
    baseline: str = "mocov2",
    delta: float = DEFAULT_DELTA,
) -> pd.DataFrame:
    """One row per (profile, method, epochs, config hash): per dataset and metric the mean,
    sample std, n and the bootstrap 95 % interval of the mean over seeds (``*_ci_low``,
    ``*_ci_high``); the comparison with ``baseline`` at the same profile and epochs (see
    ``compare_rows``); the best mean of each (profile, epochs) block (``*_best``); the
    published AP_bb and our difference to it, on paper rows only. ``delta`` is the difference
    the ``*_seeds_needed`` answer is for."""
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
    groups = dict(list(seeds.groupby(["row", "dataset"])))
    prefixes = [f"{ds}_{m}" for ds in DATASETS for m in TABLE_METRICS]
    for ds in DATASETS:
        for m in TABLE_METRICS:
            cis = [
                bootstrap_ci(groups[row, ds][m]) if (row, ds) in groups else None
                for row in out.index
            ]
            out[f"{ds}_{m}_ci_low"] = [np.nan if ci is None else ci.low for ci in cis]
            out[f"{ds}_{m}_ci_high"] = [np.nan if ci is None else ci.high for ci in cis]
    per_seed = {
        (row, f"{ds}_{m}"): seed_values(part, m)
        for (row, ds), part in groups.items()
        for m in TABLE_METRICS
    }
    out["config"] = out["config_hash"].str[:8]
    # the name in figures: the config's digits only where one method has several configs
    clash = out.duplicated(["profile", "method", "epochs"], keep=False)
    out["label"] = out["method"].where(~clash, out["method"] + " [" + out["config"] + "]")
    block = [out["profile"], out["epochs"].astype("Float64").fillna(-1)]
    n_total = out[[f"{ds}_n" for ds in DATASETS]].sum(axis=1)
    out = compare_rows(out, per_seed, prefixes, baseline, n_total, delta)
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


def seed_values(rows: pd.DataFrame, metric: str) -> dict[int, float]:
    """``{seed: value}`` of one row's runs on one dataset (runs without a seed number or a
    value cannot pair and are left out of the comparison)."""
    rows = rows.dropna(subset=["seed", metric])
    return {int(s): float(v) for s, v in zip(rows["seed"], rows[metric], strict=True)}


def block_keys(out: pd.DataFrame) -> pd.Series:
    """(profile, epochs) of every row, no pre-training as epochs −1: the rows that compare."""
    epochs = out["epochs"].astype("Float64").fillna(-1).astype(float)
    return pd.Series(list(zip(out["profile"], epochs, strict=True)), index=out.index)


def compare_rows(
    out: pd.DataFrame,
    per_seed: Mapping[tuple[Hashable, str], Mapping[int, float]],
    prefixes: Sequence[str],
    baseline: str,
    n_total: pd.Series,
    delta: float = DEFAULT_DELTA,
) -> pd.DataFrame:
    """``out`` with ``<prefix>_{delta, delta_ci_low, delta_ci_high, test, t, p, p_holm,
    resolved, pairs, mdd, seeds_needed}`` (and ``baseline_config``) of every row against the
    ``baseline`` row of its (profile, epochs) block; ``per_seed[row, prefix]`` is
    ``{seed: value}``.

    A block with several baseline rows (config hashes) compares with the one with most
    seeds (``n_total``; the first in table order on a tie); ``baseline_config`` says which.
    Holm's correction runs over the rows of one block for one prefix (one dataset and
    metric): the family of questions "is this method different from the baseline here?".
    ``resolved`` is None where there is no interval (nothing to compare)."""
    block = block_keys(out)
    if baseline in NO_PRETRAINING:
        # a baseline without pre-training has no budget: every row of its profile compares
        block = pd.Series([(p,) for p in out["profile"]], index=out.index)
    ref: dict[tuple, Hashable] = {}
    for row in n_total[out["method"] == baseline].sort_values(ascending=False, kind="stable").index:
        ref.setdefault(block[row], row)
    empty = {
        f"{prefix}_{s}": pd.Series(
            None if s in ("test", "resolved") else np.nan,
            index=out.index,
            dtype=object if s in ("test", "resolved") else float,
        )
        for prefix in prefixes
        for s in COMPARISON_STATS
    }
    out = pd.concat([out.assign(baseline_config=None), pd.DataFrame(empty)], axis=1)
    for row in out.index:
        base = ref.get(block[row])
        if base is None or base == row:
            continue
        out.at[row, "baseline_config"] = out.at[base, "config_hash"]
        for prefix in prefixes:
            a, b = per_seed.get((row, prefix)), per_seed.get((base, prefix))
            if not a or not b:
                continue
            c = compare(a, b, target=delta)
            values = {
                "delta": c.delta, "delta_ci_low": c.low, "delta_ci_high": c.high,
                "test": c.test, "t": c.t, "p": c.p, "resolved": c.resolved, "pairs": c.pairs,
                "mdd": c.mdd, "seeds_needed": c.seeds_needed,
            }  # fmt: skip
            for s, v in values.items():
                out.at[row, f"{prefix}_{s}"] = v
    for prefix in prefixes:
        for rows in out.groupby(block, sort=False).groups.values():
            out.loc[rows, f"{prefix}_p_holm"] = holm(out.loc[rows, f"{prefix}_p"].to_numpy())
    return out


def _probe_ci(
    part: pd.DataFrame, metric: str, per_image: Mapping[str, dict | None]
) -> tuple[Interval, str]:
    """The interval of one row's probe metric and what it resamples: ``seeds × images`` when
    every seed's per-image results are there (``images`` with one seed), else ``seeds``."""
    part = part.dropna(subset=[metric])
    data = [per_image.get(run_id) for run_id in part["run_id"]]
    if len(data) and all(d is not None for d in data):
        if "labels" in data[0]:
            seeds = [(d["labels"], d["predictions"]) for d in data]
            ci = hierarchical_ci(seeds, metric)
        else:
            ci = hierarchical_ci([d[metric] for d in data], "mean")
        # the estimate: the mean of what the children logged, as the tables show it
        ci = Interval(float(part[metric].mean()), ci.low, ci.high)
        return ci, "images" if len(data) == 1 else "seeds × images"
    return bootstrap_ci(part[metric]), "seeds"


def probe_summary(
    probes: pd.DataFrame,
    per_image: Mapping[str, dict | None] | None = None,
    baseline: str = "mocov2",
    delta: float = DEFAULT_DELTA,
) -> pd.DataFrame:
    """One row per benchmark config with probe runs: per (dataset, probe) the seeds
    ``<ds>_<probe>_n`` and per metric ``<ds>_<probe>_<metric>_{mean, std, ci_low, ci_high,
    ci_kind}`` (the two-level bootstrap over seeds and test images where ``per_image`` holds
    every seed's ``per_image.json``, else over seeds), then the comparison with ``baseline``
    over seeds as in ``compare_rows`` (paired by probe seed, Holm over the methods of one
    budget, MDD and seeds needed)."""
    per_image = per_image or {}
    if probes.empty:
        return pd.DataFrame(columns=[*KEYS, "pretrain_hash", "config", "label"])
    probes = probes.assign(row=probes.groupby(KEYS, dropna=False, sort=False).ngroup())
    out = probes.drop_duplicates("row").set_index("row")[[*KEYS, "pretrain_hash"]].copy()
    groups = dict(list(probes.groupby(["row", "dataset", "probe"])))
    per_seed: dict[tuple, dict[int, float]] = {}
    prefixes = []
    new: dict[str, pd.Series] = {}
    for (ds, probe), metrics in PROBES.items():
        n = [len(groups[r, ds, probe]) if (r, ds, probe) in groups else 0 for r in out.index]
        new[f"{ds}_{probe}_n"] = pd.Series(n, index=out.index, dtype=int)
        for m in metrics:
            key = f"{ds}_{probe}_{m}"
            prefixes.append(key)
            cols: dict[str, list] = {s: [] for s in ("mean", "std", "ci_low", "ci_high", "ci_kind")}
            for r in out.index:
                part = groups.get((r, ds, probe))
                if part is None or part[m].isna().all():
                    for s in cols:
                        cols[s].append(None if s == "ci_kind" else np.nan)
                    continue
                ci, kind = _probe_ci(part, m, per_image)
                cols["mean"].append(ci.estimate)
                cols["std"].append(float(part[m].std()))
                cols["ci_low"].append(ci.low)
                cols["ci_high"].append(ci.high)
                cols["ci_kind"].append(kind)
                per_seed[r, key] = seed_values(part, m)
            for s, v in cols.items():
                dtype = object if s == "ci_kind" else float
                new[f"{key}_{s}"] = pd.Series(v, index=out.index, dtype=dtype)
    out = pd.concat([out, pd.DataFrame(new)], axis=1)
    out["config"] = out["config_hash"].str[:8]
    clash = out.duplicated(["profile", "method", "epochs"], keep=False)
    out["label"] = out["method"].where(~clash, out["method"] + " [" + out["config"] + "]")
    n_total = out[[f"{ds}_{probe}_n" for ds, probe in PROBES]].sum(axis=1)
    out = compare_rows(out, per_seed, prefixes, baseline, n_total, delta)
    return ordered(out).reset_index(drop=True)
