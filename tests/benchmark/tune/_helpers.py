"""Helpers of the tune tests: a fake evaluator (no training) and MLflow run look-ups."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmark.tune.objective import TrialContext

WEIGHT = "method.concept_weight"


def fake_evaluate(ctx: TrialContext) -> None:
    """Per-seed values from the sampled concept weight: no training."""
    for seed in range(1, ctx.tune.seeds + 1):
        if not ctx.report(seed, 10.0 * ctx.params[WEIGHT] + 0.1 * seed):
            return


def write(tmp_path: Path, text: str, name: str = "tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def runs(kind: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    return client.search_runs([exp.experiment_id], f"tags.run_kind = '{kind}'")


def by_name(kind: str) -> dict:
    return {r.info.run_name: r for r in runs(kind)}
