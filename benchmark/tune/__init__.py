"""Optuna studies over a method's hyper-parameters: ``concl-bench tune``.

The search space, the objective and the short fixed budget of every trial live in
``experiments/tune/<method>.yaml`` with an optional profile overlay
``experiments/tune/<profile>/<method>.yaml`` (then ``--tune-config`` files). Keys of ``fixed``
and ``space`` are the dotted keys of the experiment config, so a best configuration is
directly a config file.

Each trial is one in-process ``run_benchmark`` of the method with the ``fixed`` overrides and
the sampled values; its value is the mean ``<metric>`` on ``<dataset>`` over the k fine-tuning
seeds. Every seed is reported to Optuna (step = seed), so ``WilcoxonPruner`` can stop a
configuration that is clearly worse than the best one before its last seeds.

Storage is Optuna's own (``sqlite:///mlruns/optuna.db``; a journal file when several worker
processes write at once; any RDB URL for workers on many machines), never MLflow's database.
MLflow holds the study parent run → one child run per trial → the benchmark's parent run
(nested by ``mlflow.parentRunId``) → its pre-training and fine-tuning runs.

``TRIALS`` is a target count of finished (complete or pruned) trials, so running again with a
larger number only adds the missing ones; every worker counts the trials, running ones
included, under a file lock before it starts one, so workers never overshoot.

Modules: ``schema`` (the study file and its validation), ``definition`` (the validated study
a worker receives), ``storage`` (storages and the lock), ``objective`` (one trial),
``worker`` (the loop of one process), ``study`` (lifecycle and MLflow parent), ``plots``,
``best`` (best configuration as a config file) and ``cli``. This file imports nothing heavy:
``concl-bench --help`` loads it.
"""

from __future__ import annotations

from benchmark.core.errors import UserError

#: The Optuna storage of one process: its own SQLite file, apart from MLflow's database.
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
#: The storage of several workers on one machine (SQLite takes parallel writers badly).
DEFAULT_JOURNAL = "mlruns/optuna.journal"


class TuneError(UserError, RuntimeError):
    """The study cannot go on (e.g. every trial fails); the message is one line."""
