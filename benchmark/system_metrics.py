"""System metrics (CPU, memory, disk, network and, with NVML, GPU utilisation and memory) on a
training run, through MLflow's own ``SystemMetricsMonitor``: the ``system/*`` charts of the
run that say whether a slow fine-tune waits on the GPU, the loader or the disk.

On by default where a stage runs on CUDA (``tracking.system_metrics: null``), off on the CPU
(the demo's runs take minutes and the samples would be noise beside two busy cores); ``true``
or ``false`` forces it. A resumed run continues the samples' steps after the last one logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: MLflow's monitor logs a line at each start and stop: not news for every seed.
_QUIET = logging.getLogger("mlflow.system_metrics")


def wanted(setting: bool | None, device: torch.device) -> bool:
    """Whether to sample: the setting when given, else only on CUDA."""
    return device.type == "cuda" if setting is None else bool(setting)


@contextmanager
def system_metrics(uri: str, run_id: str | None, cfg: Any, device: torch.device) -> Iterator[None]:
    """Sample system metrics onto ``run_id`` while the body runs (rank 0, where a run id
    exists, and only when ``wanted``); the last samples are flushed on the way out."""
    t = cfg.tracking
    if run_id is None or not uri or not wanted(t.system_metrics, device):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    _QUIET.setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=t.system_metrics_interval_s,
        resume_logging=True,
        tracking_uri=uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
