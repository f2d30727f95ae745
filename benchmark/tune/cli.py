"""``concl-bench tune``: the sub-parser and its command.

Only argparse and the light ``benchmark.tune`` package load here; Optuna, MLflow and torch
are imported when the command runs, so ``concl-bench --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from benchmark.core.schema import PROFILE_ENV
from benchmark.tune import DEFAULT_JOURNAL, DEFAULT_STORAGE, TuneError


def add_tune_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``tune`` sub-command on ``concl-bench``'s subparsers."""
    p = sub.add_parser(
        "tune",
        help="Optuna study of a method's hyper-parameters (experiments/tune/<method>.yaml)",
        description=(
            "Search METHOD's hyper-parameters with Optuna: every trial runs the benchmark with "
            "the study's short fixed budget and scores the mean GlaS box AP over k fine-tuning "
            "seeds; clearly worse trials are pruned between seeds. TRIALS is the number of "
            "finished trials the study should hold, so running again with a larger TRIALS adds "
            "only the missing ones. --best STUDY prints the best configuration as a config file."
        ),
    )
    p.add_argument("--method", "-m", help="method with an experiments/tune/<method>.yaml")
    p.add_argument("--trials", type=int, help="finished (complete or pruned) trials to reach")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--study", help="study name (default <method>-<profile>)")
    p.add_argument(
        "--storage",
        help=f"Optuna storage: RDB URL or journal file (default {DEFAULT_STORAGE}; "
        f"{DEFAULT_JOURNAL} with --workers > 1)",
    )
    p.add_argument(
        "--profile",
        default=os.environ.get(PROFILE_ENV, "auto"),
        help="paper | demo | auto (default: paper when real data is prepared, else demo)",
    )
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE", help="extra experiment YAML"
    )
    p.add_argument(
        "--tune-config", action="append", default=[], metavar="FILE", help="extra tune YAML"
    )
    p.add_argument("--best", metavar="STUDY", help="print STUDY's best configuration as YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (all trials)"
    )
    return p


def tune_command(args: argparse.Namespace) -> int:
    """``concl-bench tune``. A ``ConfigError`` propagates to the CLI's one-line handler
    (exit 2); a study that cannot go on (``TuneError``) prints its line here and exits 1."""
    from benchmark.config import ConfigError

    if args.best:
        from benchmark.tune.best import best_config_yaml

        print(best_config_yaml(args.best, args.storage), end="")
        return 0
    if not args.method:
        raise ConfigError("name the method: --method concl (make tune METHOD=concl)")
    if args.trials is None:
        raise ConfigError("set the number of finished trials: --trials N (make tune TRIALS=N)")
    from benchmark.tune.study import run_study

    try:
        run_study(
            args.method,
            args.profile,
            args.trials,
            args.workers,
            args.study,
            args.storage,
            tuple(args.config),
            tuple(args.overrides),
            tuple(args.tune_config),
        )
    except TuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
