"""The pre-training dataset: images from a folder tree or an image list.

ConCL pre-trains on NCT-CRC-HE-100K's ``train.txt`` (80 000 relative paths, labels ignored); the
demo and tests use the synthetic set from ``benchmark.data.synthetic``, which has the same layout.
Any plain folder of images works too, so users can pre-train on their own tiles. The supervised
reference row takes its labels from the same layout: the class of an image is the folder it lies
in (NCT's ``<CLASS>/<file>.tif``), so no second label source can disagree with the images.
Every problem is reported as a one-line ``DatasetError`` that says how to fix it, because a
wrong data root is the most common first-run failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from benchmark.core.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "DatasetError", "PretrainImageDataset"]

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class DatasetError(UserError, ValueError):
    """A data root or list file that cannot be used; the message says what to do."""


def _find_images(root: Path) -> list[str]:
    """Sorted POSIX paths of all images below ``root``; hidden files and folders are skipped
    (markers, partial generator output, notebook checkpoints)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel / name).as_posix())
    return sorted(found)


def _read_list(list_path: Path) -> list[str]:
    """Relative paths from an image list, one per line; a trailing integer label (as in
    ``train_labeled.txt``) is dropped and blank lines are skipped."""
    paths = []
    for line in list_path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("+-").isdigit():
            line = parts[0]
        paths.append(line)
    return paths


class PretrainImageDataset(Dataset):
    """RGB images for pre-training, with their class folders as labels on request.

    ``root`` is searched recursively for images (``IMAGE_EXTENSIONS``) unless ``list_file`` names
    an image list (relative paths are resolved against ``root``). Items are ``transform(img)``,
    or the PIL image without a transform; labels are never part of an item: ``label(index)``
    gives them to the loader of a method that asks (``Method.wants_labels``), so every other
    method's items stay as they were.
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(
                f"pre-training data root {self.root} {what}: run `make data` for the synthetic "
                "demo set, or see datasets/README.md to install NCT-CRC-HE-100K"
            )
        if list_file is None:
            self.list_file: Path | None = None
            self.paths = _find_images(self.root)
            if not self.paths:
                raise DatasetError(
                    f"no images under {self.root} (accepted extensions: "
                    f"{', '.join(IMAGE_EXTENSIONS)}): point the data root at the image folder"
                )
            return
        list_path = Path(list_file)
        if not list_path.is_absolute():
            list_path = self.root / list_path
        if not list_path.is_file():
            raise DatasetError(
                f"list file {list_path} does not exist: give a path relative to {self.root} "
                "or an absolute path, or leave it out to use every image under the root"
            )
        self.list_file = list_path
        self.paths = _read_list(list_path)
        if not self.paths:
            raise DatasetError(f"list file {list_path} lists no images: regenerate or fix it")
        missing = [p for p in self.paths if not (self.root / p).is_file()]
        if missing:
            first = ", ".join(missing[:3])
            raise DatasetError(
                f"{len(missing)} of {len(self.paths)} entries in {list_path} do not exist under "
                f"{self.root} (first: {first}): check that the list matches the data root"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def classes(self) -> list[str]:
        """Sorted class names: the first folder of each relative path (NCT's tissue types).

        Computed on first use, so unlabelled pre-training never needs class folders; an image
        directly under the root is refused then, in one line, because it has no class.
        """
        for path in self.paths:
            if len(PurePosixPath(path).parts) < 2:
                raise DatasetError(
                    f"image {path} lies directly under {self.root}, not in a class folder: the "
                    "supervised method needs class folders (<root>/<CLASS>/<image>) for its labels"
                )
        return sorted({PurePosixPath(p).parts[0] for p in self.paths})

    @cached_property
    def _class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def label(self, index: int) -> int:
        """Index into ``classes`` of sample ``index``'s class folder."""
        return self._class_index[PurePosixPath(self.paths[index]).parts[0]]

    def __getitem__(self, index: int) -> Any:
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for corrupt files
            raise DatasetError(
                f"cannot read image {path} ({type(exc).__name__}: {' '.join(str(exc).split())}): "
                "replace or delete the "
                "file, or remove it from the list file"
            ) from exc
        return self.transform(img) if self.transform is not None else img

    def __repr__(self) -> str:
        source = self.list_file if self.list_file is not None else "all images"
        return f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images from {source})"
