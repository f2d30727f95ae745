"""The study's plots: optimisation history, parameter importances and slices, as PNGs."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from benchmark.core.errors import with_type
from benchmark.tune.storage import quiet_optuna


def state_counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.trials]
    return {
        "n_complete": states.count(TrialState.COMPLETE),
        "n_pruned": states.count(TrialState.PRUNED),
        "n_failed": states.count(TrialState.FAIL),
    }


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, parameter importances (when computable) and slice plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    quiet_optuna()
    n_complete = state_counts(study)["n_complete"]
    if n_complete == 0:
        print("==> note: no complete trial yet: no plots", file=sys.stderr)
        return []
    label = (study.metric_names or ["Objective Value"])[0]
    int_params = {
        name
        for t in study.trials
        for name, dist in t.distributions.items()
        if isinstance(dist, IntDistribution)
    }
    plots: list[tuple[str, Callable[[], Any]]] = [
        (
            "optimization_history.png",
            lambda: ovm.plot_optimization_history(study, target_name=label),
        )
    ]
    if n_complete >= 2:
        plots.append(("param_importances.png", lambda: ovm.plot_param_importances(study)))
    else:
        print("==> note: parameter importances need 2 complete trials: skipped", file=sys.stderr)
    plots.append(("slice.png", lambda: ovm.plot_slice(study, target_name=label)))
    written = []
    for filename, draw in plots:
        try:
            with warnings.catch_warnings():  # a parameter with one sampled value so far
                warnings.filterwarnings("ignore", "Attempting to set identical low and high")
                axes = draw()
        except Exception as exc:  # e.g. importances of a single distinct configuration
            print(f"==> note: {filename} skipped: {with_type(exc)}", file=sys.stderr)
            plt.close("all")
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        fig = first.figure
        _tidy(filename, fig, int_params)
        fig.suptitle(f"study {study.study_name}", fontsize=10)
        path = out / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _tidy(filename: str, fig: Any, int_params: set[str]) -> None:
    """Readable as saved: room for the legend and for one panel per parameter, whole
    trial numbers, and log axes labelled 0.05 0.1 0.2 rather than crowded 10^x powers."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    if filename == "optimization_history.png":
        fig.set_size_inches(9.0, 4.8)
        fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if filename == "slice.png":
        fig.set_size_inches(max(6.0, 3.4 * len(fig.axes)), 4.2)
        for ax in fig.axes:
            if ax.get_xscale() == "log":
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            elif ax.get_xlabel() in int_params:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(axis="x", labelrotation=30)
