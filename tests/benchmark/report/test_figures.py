"""The figures' fixed encodings: a method keeps its colour, every row its key."""

from __future__ import annotations

import pandas as pd

from benchmark.report.figures import method_color, row_keys
from benchmark.report.runs import METHOD_ORDER


def test_every_method_keeps_one_colour():
    assert [method_color(m) for m in METHOD_ORDER] == [f"C{i}" for i in range(7)]
    assert method_color("random") == "0.45" and method_color("supervised") == "0.1"
    assert method_color("weights-0a1b2c") == method_color("weights-0a1b2c")
    assert method_color("weights-0a1b2c") in {"C7", "C8", "C9"}


def test_row_keys_are_one_string_per_row_without_pre_training_too():
    frame = pd.DataFrame(
        {
            "profile": ["paper", "demo"],
            "method": ["concl", "random"],
            "epochs": pd.array([200, None], dtype="Int64"),
            "config_hash": ["c", "r"],
        }
    )
    assert list(row_keys(frame)) == ["paper|concl|200|c", "demo|random|-|r"]
