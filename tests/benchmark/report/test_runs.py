"""Reading the store back: only finished benchmark seeds count, and a resumed run's
repeated steps keep their later values."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from benchmark.report.runs import load_runs, metric_curves, seed_frame
from tests.benchmark.report._store import BENCHMARKS, EXPERIMENT, PAPER_CONCL


def test_seed_frame_holds_only_finished_benchmark_seeds(built):
    seeds = built.result.seeds
    expected = sum(len(v) for per_ds in BENCHMARKS.values() for v in per_ds.values())
    assert len(seeds) == expected
    assert set(seeds["config_hash"]) == {k[3] for k in BENCHMARKS}  # no tuning trial
    assert seeds["bbox_AP"].max() < 99  # no failed seed, no trial, no pre-training metric
    assert 0.0 not in set(seeds["bbox_AP"])  # no running seed
    concl = seeds[seeds["config_hash"] == PAPER_CONCL[3]]
    assert sorted(concl.loc[concl["dataset"] == "glas", "seed"]) == [1, 2, 3, 4]
    # random init never pre-trained: its epochs tag means nothing
    assert seeds.loc[seeds["method"] == "random", "epochs"].isna().all()
    # the report run now in the store changes nothing
    client = MlflowClient(built.uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    again = seed_frame(load_runs(client, exp))
    pd.testing.assert_frame_equal(again, seeds)


def test_curves_keep_the_last_value_of_a_repeated_step(built):
    client = MlflowClient(built.uri)
    curve = metric_curves(client, [built.ids[f"{PAPER_CONCL[3]}/glas/1"]], "train_loss")
    assert list(zip(curve["step"], curve["value"], strict=True)) == [
        (10, 3.0),
        (20, 2.0),
        (30, 1.5),
    ]
    pre = metric_curves(client, [built.ids["pretrain"]], "loss")
    assert list(pre["value"]) == [10.0, 8.0, 7.0]
