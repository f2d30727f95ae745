"""The results report: every finished benchmark in the MLflow store as the paper's table.

``build_report`` reads the store (never the run folders, so it works on a copied
``mlflow.db``), writes ``results.md``/``results.csv`` and the figures, and logs them to a new
``stage=report`` run. Imports flow one way: ``runs`` (read the store; the row keys and
method order) ← ``summary`` (statistics), ``table`` (every results table, also the row
``make benchmark`` prints), ``figures`` ← ``build``; ``statistics`` (bootstrap intervals,
paired / Welch tests, Holm, power) underlies ``summary``. The frames are built by pure
functions (``seed_frame``, ``probe_frame``, ``summary_table``, ``probe_summary``,
``markdown_report``) so tests can check them on hand-made values. Probe results go to
``probes.csv`` beside ``results.csv``.

The names below are loaded on first use, so that ``benchmark.pipeline`` importing
``benchmark.report.table`` pulls in neither MLflow nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmark.report.build import ReportResult, build_report
    from benchmark.report.figures import write_figures
    from benchmark.report.runs import (
        KEYS,
        METHOD_ORDER,
        load_per_image,
        load_published,
        load_runs,
        metric_curves,
        pretrain_runs,
        probe_frame,
        seed_frame,
    )
    from benchmark.report.summary import probe_summary, summary_table
    from benchmark.report.table import (
        csv_frame,
        markdown_report,
        probe_csv_frame,
        results_table,
        section_table,
    )

_EXPORTS = {
    "ReportResult": "build",
    "build_report": "build",
    "write_figures": "figures",
    "KEYS": "runs",
    "METHOD_ORDER": "runs",
    "load_per_image": "runs",
    "load_published": "runs",
    "load_runs": "runs",
    "metric_curves": "runs",
    "pretrain_runs": "runs",
    "probe_frame": "runs",
    "seed_frame": "runs",
    "probe_summary": "summary",
    "summary_table": "summary",
    "csv_frame": "table",
    "probe_csv_frame": "table",
    "markdown_report": "table",
    "results_table": "table",
    "section_table": "table",
}
__all__ = [
    "KEYS",
    "METHOD_ORDER",
    "ReportResult",
    "build_report",
    "csv_frame",
    "load_per_image",
    "load_published",
    "load_runs",
    "markdown_report",
    "metric_curves",
    "pretrain_runs",
    "probe_csv_frame",
    "probe_frame",
    "probe_summary",
    "results_table",
    "section_table",
    "seed_frame",
    "summary_table",
    "write_figures",
]


def __getattr__(name: str) -> Any:
    """``name`` from the submodule that defines it, imported on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
