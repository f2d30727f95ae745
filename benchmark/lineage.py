"""What a run was trained and tested on, and which code ran it, in MLflow's own terms.

The runs page's Dataset column reads a run's dataset inputs (``MlflowClient.log_inputs``) and
its Source column reads the ``mlflow.source.*`` system tags, so both are filled here rather
than in custom tags the UI cannot show. A dataset's digest is taken over what identifies its
content cheaply and exactly enough to tell two sets apart: every image's relative path and
byte size, and for a detection set the bytes of its COCO annotation file. A run on other
data (a regenerated synthetic set, another release) therefore shows another digest.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_REPO_URL,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

#: What the Source column shows for every run of the suite (the command-line entry point).
SOURCE_NAME = "concl-bench"
#: Marks a run made from a checkout with uncommitted changes to tracked files.
DIRTY_TAG = "git_dirty"
_DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a digest


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def source_tags() -> dict[str, str]:
    """MLflow's source system tags for a run started from this checkout: the commit, branch
    and remote the UI links to, the user, and ``git_dirty`` when tracked files changed (the
    commit alone then does not say what ran)."""
    tags = {
        MLFLOW_SOURCE_TYPE: "LOCAL",
        MLFLOW_SOURCE_NAME: SOURCE_NAME,
        MLFLOW_USER: getpass.getuser(),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[MLFLOW_GIT_BRANCH] = branch
        remote = _git("config", "--get", "remote.origin.url")
        if remote and "://" in remote:  # a local path says nothing to another reader
            tags[MLFLOW_GIT_REPO_URL] = remote
        if _git("status", "--porcelain", "--untracked-files=no"):
            tags[DIRTY_TAG] = "true"
    return tags


def git_commit() -> str:
    """The checked-out commit (``+dirty`` when tracked files changed), or ``unknown``."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return f"{commit}+dirty" if _git("status", "--porcelain", "--untracked-files=no") else commit


def files_digest(root: Path, relpaths: Iterable[str], extra: Iterable[Path] = ()) -> str:
    """A digest of the images ``relpaths`` under ``root`` (path and size of each) and of the
    bytes of the ``extra`` files (annotations)."""
    h = hashlib.sha256()
    for rel in relpaths:
        h.update(f"{rel}:{(root / rel).stat().st_size}\n".encode())
    for path in extra:
        h.update(path.name.encode() + b"\n")
        h.update(path.read_bytes())
    return h.hexdigest()[:_DIGEST_CHARS]


def dataset_input(
    name: str,
    root: Path,
    digest: str,
    context: str,
    profile: Mapping[str, Any],
) -> DatasetInput:
    """One dataset input of a run: ``name`` at ``root`` with ``digest``, used for ``context``
    (``pretrain``, ``train`` or ``test``: the UI shows it beside the name); ``profile`` (the
    split, image count, benchmark profile, whether synthetic) is shown with it."""
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type="local",
        source=LocalArtifactDatasetSource(Path(root).resolve().as_uri()).to_json(),
        profile=json.dumps(dict(profile), sort_keys=True),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def folder_input(
    root: Path,
    relpaths: list[str],
    context: str,
    split: str,
    benchmark_profile: str,
    synthetic: bool,
) -> DatasetInput:
    """An image folder as a run's input, named after the folder (e.g. NCT-CRC-HE-100K)."""
    profile = {
        "split": split,
        "images": len(relpaths),
        "profile": benchmark_profile,
        "synthetic": synthetic,
    }
    digest = files_digest(Path(root), relpaths)
    return dataset_input(Path(root).name, root, digest, context, profile)


def pretrain_input(
    root: Path, relpaths: list[str], benchmark_profile: str, synthetic: bool
) -> DatasetInput:
    """The pre-training set as a run's input."""
    return folder_input(root, relpaths, "pretrain", "train", benchmark_profile, synthetic)


def coco_inputs(
    title: str, root: Path, benchmark_profile: str, synthetic: bool
) -> list[DatasetInput]:
    """The train and test inputs of a converted detection set (``root/annotations/*.json``
    and the images they list)."""
    out = []
    for split in ("train", "test"):
        anno = Path(root) / "annotations" / f"{split}.json"
        images = [img["file_name"] for img in json.loads(anno.read_text())["images"]]
        digest = files_digest(Path(root) / split, images, [anno])
        profile = {
            "split": split,
            "images": len(images),
            "profile": benchmark_profile,
            "synthetic": synthetic,
        }
        out.append(dataset_input(f"{title} {split}", root, digest, split, profile))
    return out
