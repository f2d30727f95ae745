"""``make report``: read the store, write the tables and figures, log them to a report run.

Fine-tuning results go to ``results.csv``; probe results, whose columns are another set
(dataset × probe × metric), to ``probes.csv`` beside it, written only when the store holds
probe runs, so ``results.csv`` keeps its columns whether or not a benchmark probed."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from benchmark import tracking
from benchmark.config import ConfigError
from benchmark.core.schema import RUN_KIND_TAG, STAGE_TAG
from benchmark.report.figures import write_figures
from benchmark.report.runs import (
    DEFAULT_DELTA,
    KEYS,
    load_per_image,
    load_published,
    load_runs,
    metric_curves,
    pretrain_runs,
    probe_frame,
    seed_frame,
)
from benchmark.report.summary import probe_summary, summary_table
from benchmark.report.table import csv_frame, markdown_report, probe_csv_frame
from benchmark.tracking import Tracker


@dataclass
class ReportResult:
    """What ``build_report`` wrote and the frames it wrote them from."""

    run_id: str
    markdown: Path
    csv: Path
    figures: list[Path]
    seeds: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    #: ``probes.csv``; None when the store holds no finished probe run.
    probes_csv: Path | None = None
    probes: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    probe_summary: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)


def build_report(
    tracking_uri: str | None,
    experiment: str,
    out_dir: Path,
    baseline: str = "mocov2",
    published: Path | None = None,
    delta: float = DEFAULT_DELTA,
) -> ReportResult:
    """Tables and figures of every finished benchmark in ``experiment``, logged to a new
    ``stage=report`` run. ``MLFLOW_TRACKING_URI`` wins over ``tracking_uri``, as in the rest
    of the suite. Nothing is written when the store holds no finished benchmark. ``delta``:
    the difference (points) the seeds-needed figures are for."""
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
    summary = summary_table(seeds, load_published(published), baseline, delta)
    probes = probe_frame(runs)
    probe_sum = probe_summary(probes, load_per_image(client, probes), baseline, delta)
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
        tags={STAGE_TAG: "report", RUN_KIND_TAG: "report", "baseline": baseline},
        run_name=f"report {now:%Y-%m-%d %H:%M}",
    )
    run_id = run.info.run_id
    status = "FAILED"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[Path]] = {}
        for profile in dict.fromkeys(summary["profile"]):
            written[profile] = write_figures(
                profile,
                seeds[seeds["profile"] == profile],
                summary[summary["profile"] == profile],
                pre_curves[pre_curves["profile"] == profile],
                ft_curves[ft_curves["profile"] == profile],
                out_dir,
                probes[probes["profile"] == profile],
                probe_sum[probe_sum["profile"] == profile],
            )
        source = (
            f"Generated {now:%Y-%m-%d %H:%M %Z} from MLflow experiment `{experiment}` at "
            f"`{uri}` ({len(seeds)} finished fine-tuning runs); logged as artifacts of run "
            f"`{run_id}`."
        )
        md = out_dir / "results.md"
        md.write_text(markdown_report(summary, baseline, source, written, probe_sum, delta))
        csv = out_dir / "results.csv"
        csv_frame(summary).to_csv(csv, index=False, float_format="%.6g")
        probes_csv = None
        if not probe_sum.empty:
            probes_csv = out_dir / "probes.csv"
            probe_csv_frame(probe_sum).to_csv(probes_csv, index=False, float_format="%.6g")
        paths = [p for ps in written.values() for p in ps]
        for path in [md, csv, *([probes_csv] if probes_csv else []), *paths]:
            tracker.log_artifact(run_id, path)
        tracker.log_params(run_id, {"baseline": baseline, "rows": len(summary), "delta": delta})
        status = "FINISHED"
    finally:
        tracker.finish(run_id, status)
    return ReportResult(run_id, md, csv, paths, seeds, summary, probes_csv, probes, probe_sum)
