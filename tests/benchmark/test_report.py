"""The results report on a store of hand-chosen values: exact table cells, Welch's test
against a hand computation, what is left out, and what is written and logged."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats

from benchmark.config import ConfigError
from benchmark.report import (
    build_report,
    load_published,
    load_runs,
    metric_curves,
    seed_frame,
    summary_table,
)
from benchmark.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "concl-bench"

# (profile, method, epochs, config hash) -> dataset -> [(bbox_AP, segm_AP) per seed]
BENCHMARKS: dict[tuple[str, str, int, str], dict[str, list[tuple[float, float]]]] = {
    ("paper", "mocov2", 200, "mmmm2000pppp"): {
        "glas": [(50, 51), (52, 53), (54, 55)],
        "crag": [(48, 50), (50, 52)],
    },
    ("paper", "concl", 200, "cccc2000pppp"): {
        "glas": [(56, 57), (57, 58), (58, 59), (61, 62)],
        "crag": [(55, 50.5), (56, 51.5)],
    },
    ("paper", "densecl", 200, "dddd2000pppp"): {"glas": [(53, 54)], "crag": [(51, 49)]},
    ("paper", "concl", 400, "cccc4000pppp"): {
        "glas": [(58, 59), (59, 60)],
        "crag": [(54, 53), (55, 54)],
    },
    ("demo", "mocov2", 2, "aaaa1111demo"): {"glas": [(20, 19), (22, 21)]},
    ("demo", "mocov2", 2, "bbbb2222demo"): {"glas": [(21, 22)]},
    ("demo", "concl", 2, "cccc3333demo"): {"glas": [(25, 24), (27, 26)]},
    ("demo", "random", 2, "rrrr0000demo"): {"glas": [(15, 14)]},
}
PAPER_CONCL = ("paper", "concl", 200, "cccc2000pppp")


def _bench(tracker: Tracker, profile, method, epochs, chash, tags=None) -> str:
    return tracker.parent_run(
        method,
        chash,
        {
            "epochs": str(epochs),
            "profile": profile,
            "pretrain_hash": f"pre-{chash}",
            **(tags or {}),
        },
    )


def _seed(tracker: Tracker, parent: str, ds: str, seed: int, bbox, segm, status="FINISHED"):
    child, _ = tracker.child_run(parent, "finetune", {"dataset": ds, "seed": seed})
    tracker.log_metrics(child, {"bbox_AP": bbox, "segm_AP": segm, "bbox_AP50": 90.0}, step=100)
    tracker.finish(child, status)
    return child


def fill(tracker: Tracker) -> dict[str, str]:
    """The store: the benchmarks above plus everything the report must leave out."""
    ids: dict[str, str] = {}
    for (profile, method, epochs, chash), per_ds in BENCHMARKS.items():
        parent = _bench(tracker, profile, method, epochs, chash)
        ids[chash] = parent
        for ds, values in per_ds.items():
            for seed, (bbox, segm) in enumerate(values, start=1):
                ids[f"{chash}/{ds}/{seed}"] = _seed(tracker, parent, ds, seed, bbox, segm)
        tracker.finish(parent)
    concl = ids[PAPER_CONCL[3]]
    # not results: an unfinished and a failed seed, a tuning trial, a pre-training child
    _seed(tracker, concl, "glas", 5, 0.0, 0.0, status="RUNNING")
    _seed(tracker, concl, "glas", 6, 99.0, 99.0, status="FAILED")
    trial = _bench(tracker, "paper", "concl", 200, "tttt2000tune", {"tune_study": "concl-s1"})
    _seed(tracker, trial, "glas", 1, 99.0, 99.0)
    pre, _ = tracker.child_run(
        concl, "pretrain", {"method": "concl", "pretrain_hash": "pre-cccc2000pppp"}
    )
    for epoch, loss in ((1, 10.0), (2, 8.0), (3, 7.0)):
        tracker.log_metrics(pre, {"loss": loss, "bbox_AP": 99.0}, step=epoch)
    tracker.finish(pre)
    ids["pretrain"] = pre
    # a resumed fine-tuning run logs steps 20 and 30 twice: the later values count
    child = ids[f"{PAPER_CONCL[3]}/glas/1"]
    history = [(10, 3.0), (20, 2.5), (30, 2.4), (20, 2.0), (30, 1.5)]
    tracker.client.log_batch(
        child, metrics=[Metric("train_loss", v, 1000 + i, s) for i, (s, v) in enumerate(history)]
    )
    for seed in (2, 3, 4):
        run = ids[f"{PAPER_CONCL[3]}/glas/{seed}"]
        tracker.log_metrics(run, {"train_loss": 2.0 + seed}, step=10)
    return ids


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One store and one report for the module (the report is the slow part: figures)."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # the suite's rule: the variable wins
        tracker = Tracker(EXPERIMENT, uri, str(root / "artifacts"))
        ids = fill(tracker)
        published = REPO / "experiments" / "paper" / "published.csv"
        result = build_report(uri, EXPERIMENT, root / "out", published=published)
    md = result.markdown.read_text()
    return SimpleNamespace(uri=uri, ids=ids, result=result, md=md, tracker=tracker)


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
    """t = (m1 - m2) / sqrt(s1²/n1 + s2²/n2), Welch–Satterthwaite df, two-sided p."""
    v1, v2 = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(a) - 1) + v2**2 / (len(b) - 1))
    return t, 2 * stats.t.sf(abs(t), df)


def values(key, ds: str, metric: int) -> list[float]:
    return [float(v[metric]) for v in BENCHMARKS[key][ds]]


def row(summary: pd.DataFrame, profile: str, method: str, chash: str) -> pd.Series:
    hit = summary[(summary["profile"] == profile) & (summary["config_hash"] == chash)]
    assert len(hit) == 1 and hit["method"].iloc[0] == method
    return hit.iloc[0]


def section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start : end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ")
    ]


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


def test_means_stds_n_and_bold_marks(built):
    s = built.result.summary
    concl = row(s, "paper", "concl", PAPER_CONCL[3])
    assert concl["glas_bbox_AP_mean"] == pytest.approx(58.0)
    assert concl["glas_bbox_AP_std"] == pytest.approx(math.sqrt(14 / 3))
    assert concl["glas_n"] == 4 and concl["crag_n"] == 2
    densecl = row(s, "paper", "densecl", "dddd2000pppp")
    assert densecl["glas_n"] == 1 and math.isnan(densecl["glas_bbox_AP_std"])
    mocov2 = row(s, "paper", "mocov2", "mmmm2000pppp")
    # best per (profile, epochs) block; CRAG AP_mk is a tie (51.0 both) so both are bold
    assert concl["glas_bbox_AP_best"] and not mocov2["glas_bbox_AP_best"]
    assert concl["crag_segm_AP_best"] and mocov2["crag_segm_AP_best"]
    assert not densecl["crag_segm_AP_best"]
    alone = row(s, "paper", "concl", "cccc4000pppp")  # the only row at 400 epochs
    assert not alone["glas_bbox_AP_best"]
    assert list(s["profile"]) == ["paper"] * 4 + ["demo"] * 4
    assert list(s["method"][:4]) == ["mocov2", "densecl", "concl", "concl"]


def test_welch_against_hand_computation(built):
    s = built.result.summary
    concl = row(s, "paper", "concl", PAPER_CONCL[3])
    base = ("paper", "mocov2", 200, "mmmm2000pppp")
    for ds, metric, i in (("glas", "bbox_AP", 0), ("glas", "segm_AP", 1), ("crag", "bbox_AP", 0)):
        a, b = values(PAPER_CONCL, ds, i), values(base, ds, i)
        t, p = welch_by_hand(a, b)
        assert concl[f"{ds}_{metric}_t"] == pytest.approx(t, rel=1e-9)
        assert concl[f"{ds}_{metric}_p"] == pytest.approx(p, rel=1e-9)
        assert concl[f"{ds}_{metric}_delta"] == pytest.approx(
            statistics.fmean(a) - statistics.fmean(b)
        )
    # demo: the mocov2 baseline with most seeds (aaaa1111) is the reference
    demo = row(s, "demo", "concl", "cccc3333demo")
    t, p = welch_by_hand([25, 27], [20, 22])
    assert (demo["glas_bbox_AP_t"], demo["glas_bbox_AP_p"]) == (pytest.approx(t), pytest.approx(p))
    assert demo["baseline_config"] == "aaaa1111demo"
    # n = 1 on one side: a difference but no test; the baseline and a lone budget: nothing
    densecl = row(s, "paper", "densecl", "dddd2000pppp")
    assert densecl["glas_bbox_AP_delta"] == pytest.approx(1.0)
    assert math.isnan(densecl["glas_bbox_AP_p"]) and math.isnan(densecl["glas_bbox_AP_t"])
    for r in (row(s, "paper", "mocov2", "mmmm2000pppp"), row(s, "paper", "concl", "cccc4000pppp")):
        assert math.isnan(r["glas_bbox_AP_delta"]) and math.isnan(r["glas_bbox_AP_p"])


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


def test_figures_and_tables_are_logged_to_a_report_run(built):
    result = built.result
    names = {p.name for p in result.figures}
    assert names == {
        f"{kind}_{profile}.png"
        for kind in ("ap_vs_epochs", "seeds", "pretrain_loss", "finetune_loss")
        for profile in ("paper", "demo")
    } - {"pretrain_loss_demo.png", "finetune_loss_demo.png"}  # no demo histories logged
    for path in result.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"]({path.name})" in built.md
    client = MlflowClient(built.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["stage"], run.data.tags["run_kind"]) == ("report", "report")
    assert run.info.run_name.startswith("report ")
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert logged == names | {"results.md", "results.csv"}


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


def test_summary_table_is_pure_and_published_file_matches_readme():
    published = load_published()  # experiments/paper/published.csv from the repository root
    assert len(published) == 19
    concl = published[(published["method"] == "concl") & (published["epochs"] == 800)].iloc[0]
    assert (concl["glas_bbox_AP"], concl["crag_bbox_AP"]) == (58.6, 55.0)
    assert set(published["method"]) == {
        "simclr",
        "byol",
        "pcl",
        "mocov1",
        "mocov2",
        "densecl",
        "concl",
    }
    seeds = pd.DataFrame(
        {
            "profile": "paper", "method": ["byol"] * 2 + ["mocov2"] * 2,
            "epochs": pd.array([400] * 4, dtype="Int64"), "config_hash": ["b"] * 2 + ["m"] * 2,
            "dataset": "glas", "seed": [1, 2, 1, 2], "bbox_AP": [50.0, 51.0, 53.0, 55.0],
            "segm_AP": [1.0, 2.0, 3.0, 4.0], "run_id": list("wxyz"), "parent_id": "p",
            "pretrain_hash": "h",
        }
    )  # fmt: skip
    out = summary_table(seeds, published, baseline="byol")
    mocov2 = out[out["method"] == "mocov2"].iloc[0]
    t, p = welch_by_hand([53, 55], [50, 51])
    assert (mocov2["glas_bbox_AP_t"], mocov2["glas_bbox_AP_p"]) == (
        pytest.approx(t),
        pytest.approx(p),
    )
    assert mocov2["glas_bbox_AP_paper_delta"] == pytest.approx(54.0 - 54.6)
    assert out["crag_n"].tolist() == [0, 0]


def test_empty_store_is_one_clear_error_and_writes_nothing(built, tmp_path: Path, monkeypatch):
    # the module's store (a new sqlite file costs seconds of migrations), other experiments
    monkeypatch.setenv("MLFLOW_TRACKING_URI", built.uri)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="run `make benchmark` first"):
        build_report(built.uri, "never-run", out)
    assert not out.exists()
    assert MlflowClient(built.uri).get_experiment_by_name("never-run") is None  # not created
    # an experiment with only a tuning trial and a running seed holds no result either
    tracker = Tracker("only-trials", built.uri, str(tmp_path / "artifacts"))
    trial = _bench(tracker, "demo", "concl", 2, "trial", {"tune_study": "s"})
    _seed(tracker, trial, "glas", 1, 30.0, 30.0)
    parent = _bench(tracker, "demo", "concl", 2, "real")
    _seed(tracker, parent, "glas", 1, 30.0, 30.0, status="RUNNING")
    with pytest.raises(ConfigError, match="no finished benchmark runs in experiment 'only-trials'"):
        build_report(built.uri, "only-trials", out)
    assert not out.exists()
    assert tracker.client.search_runs([tracker.experiment_id], "tags.run_kind = 'report'") == []
