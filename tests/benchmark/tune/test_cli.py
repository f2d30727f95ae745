"""``concl-bench tune``: a light import, and one-line errors before anything heavy runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tune", "--trials", "2"], "error: name the method: --method concl"),
        (["tune", "--method", "concl"], "error: set the number of finished trials"),
        (["tune", "--method", "mocov2", "--trials", "1", "--profile", "demo"],
         "error: no Optuna study defined for method 'mocov2'"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_errors_with_exit_2(argv: list[str], message: str, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err


def test_best_of_a_missing_study_names_the_studies_there(tmp_path: Path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    import optuna

    optuna.create_study(study_name="other", storage=storage)
    assert main(["tune", "--best", "nope", "--storage", storage]) == 2
    assert "error: no study 'nope' in the storage; studies there:" in capsys.readouterr().err
