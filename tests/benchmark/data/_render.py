"""A check both synthetic renderers (NCT patches, gland tiles) must pass."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def assert_deterministic_and_seed_dependent(
    render: Callable[[int, int], tuple[np.ndarray, np.ndarray]], labels_differ: bool
) -> None:
    """``render(seed, index)`` gives the same image and labels for the same arguments, and a
    clearly different image (mean absolute difference > 5 grey levels) for another seed."""
    a, la = render(3, 7)
    b, lb = render(3, 7)
    c, lc = render(4, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5
    if labels_differ:
        assert not np.array_equal(la, lc)
