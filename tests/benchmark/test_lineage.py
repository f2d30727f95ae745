"""Dataset inputs and source tags, in MLflow's terms, checked against hand-made values."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from benchmark.lineage import (
    DIRTY_TAG,
    coco_inputs,
    files_digest,
    git_commit,
    pretrain_input,
    source_tags,
)


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_files_digest_is_paths_sizes_and_annotation_bytes(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"12345")
    (tmp_path / "b.png").write_bytes(b"1")
    anno = tmp_path / "train.json"
    anno.write_bytes(b"{}")
    expected = hashlib.sha256(b"a.png:5\nb.png:1\ntrain.json\n{}").hexdigest()[:16]
    assert files_digest(tmp_path, ["a.png", "b.png"], [anno]) == expected
    (tmp_path / "b.png").write_bytes(b"22")  # same name, other content size
    assert files_digest(tmp_path, ["a.png", "b.png"], [anno]) != expected


def test_coco_inputs_name_split_context_and_profile(tmp_path: Path):
    for split, names in (("train", ["x.png", "y.png"]), ("test", ["z.png"])):
        (tmp_path / split).mkdir()
        for n in names:
            (tmp_path / split / n).write_bytes(b"px")
        images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"{split}.json").write_text(json.dumps({"images": images}))
    train, test = coco_inputs("GlaS", tmp_path, "demo", synthetic=True)
    assert (train.dataset.name, test.dataset.name) == ("GlaS train", "GlaS test")
    assert [t.value for t in train.tags if t.key == MLFLOW_DATASET_CONTEXT] == ["train"]
    assert [t.value for t in test.tags if t.key == MLFLOW_DATASET_CONTEXT] == ["test"]
    assert json.loads(train.dataset.profile) == {
        "images": 2,
        "profile": "demo",
        "split": "train",
        "synthetic": True,
    }
    anno = tmp_path / "annotations" / "test.json"
    assert test.dataset.digest == files_digest(tmp_path / "test", ["z.png"], [anno])
    assert json.loads(train.dataset.source)["uri"] == tmp_path.resolve().as_uri()


def test_pretrain_input_is_the_folder_name(tmp_path: Path):
    root = tmp_path / "NCT-CRC-HE-100K"
    (root / "ADI").mkdir(parents=True)
    (root / "ADI" / "a.tif").write_bytes(b"abc")
    got = pretrain_input(root, ["ADI/a.tif"], "paper", synthetic=False)
    assert got.dataset.name == "NCT-CRC-HE-100K"
    assert got.dataset.digest == hashlib.sha256(b"ADI/a.tif:3\n").hexdigest()[:16]
    assert [t.value for t in got.tags] == ["pretrain"]


def test_source_tags_follow_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert MLFLOW_GIT_COMMIT not in source_tags()  # not a git checkout: no commit claimed
    assert git_commit() == "unknown"
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "f.txt").write_text("1")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "commit", "-qm", "one")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    tags = source_tags()
    assert tags[MLFLOW_GIT_COMMIT] == sha and tags[MLFLOW_GIT_BRANCH] == "main"
    assert (tags[MLFLOW_SOURCE_TYPE], tags[MLFLOW_SOURCE_NAME]) == ("LOCAL", "concl-bench")
    assert DIRTY_TAG not in tags and git_commit() == sha
    (tmp_path / "f.txt").write_text("2")
    assert source_tags()[DIRTY_TAG] == "true" and git_commit() == f"{sha}+dirty"
