"""Completion markers and atomic publishing: a failed write is one line and leaves nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from benchmark.core.errors import UserError
from benchmark.data.markers import publish, read_marker


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_publish_writes_the_marker_last_and_renames_into_place(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "set"
    publish(root, {"n": 1}, lambda tmp: (tmp / "x.txt").write_text("x"), lambda: False)
    assert read_marker(root) == {"n": 1} and (root / "x.txt").read_text() == "x"
    assert _tree(tmp_path) == ["a", "a/b", "a/b/set", "a/b/set/.complete", "a/b/set/x.txt"]


@pytest.mark.parametrize(
    ("code", "todo"),
    [(errno.ENOSPC, "free some space or choose another folder"),
     (errno.EROFS, "choose a writable folder")],
)  # fmt: skip
def test_a_write_that_fails_is_one_line_and_leaves_nothing(
    tmp_path: Path, code: int, todo: str
) -> None:
    def fill(tmp: Path) -> None:
        (tmp / "half.txt").write_text("x")
        raise OSError(code, "simulated", str(tmp / "half.txt"))

    root = tmp_path / "new" / "deeper" / "set"
    with pytest.raises(UserError) as info:
        publish(root, {"n": 1}, fill, lambda: False)
    message = str(info.value)
    assert message.startswith(f"cannot write {root}: simulated (") and message.endswith(todo)
    assert isinstance(info.value, ValueError)  # callers that caught ValueError still do
    assert _tree(tmp_path) == []  # partial folder and the parents made for it are gone


def test_an_uncreatable_root_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"cannot write .*file/set: Not a directory"):
        publish(tmp_path / "file" / "set", {}, lambda tmp: None, lambda: False)
    assert _tree(tmp_path) == ["file"]
