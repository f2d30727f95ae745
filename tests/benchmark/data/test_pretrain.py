"""Tests for the pre-training image dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data.pretrain import IMAGE_EXTENSIONS, DatasetError, PretrainImageDataset
from benchmark.data.synthetic import write_pretrain_set


def _save(path: Path, value: int, size: int = 8, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def nct_root(tmp_path: Path) -> Path:
    """A tiny NCT-style tree: class folders of .tif files plus non-image clutter."""
    root = tmp_path / "NCT"
    _save(root / "TUM" / "TUM-AAA.tif", 10)
    _save(root / "ADI" / "ADI-BBB.tif", 20)
    _save(root / "ADI" / "ADI-AAA.TIF", 30, fmt="TIFF")  # extension match is case-insensitive
    (root / "train.txt").write_text("ADI/ADI-BBB.tif\n")
    (root / "notes.md").write_text("not an image")
    _save(root / ".cache" / "hidden.png", 40)
    return root


def test_folder_discovery_is_recursive_sorted_and_skips_non_images(nct_root: Path) -> None:
    ds = PretrainImageDataset(nct_root)
    assert ds.root == nct_root
    assert ds.paths == ["ADI/ADI-AAA.TIF", "ADI/ADI-BBB.tif", "TUM/TUM-AAA.tif"]
    assert len(ds) == 3
    img = ds[2]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [10, 10, 10]


def test_plain_folder_of_pngs_and_rgb_conversion(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"tile_{i}.png", 50 + i)
    Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(tmp_path / "grey.png")
    ds = PretrainImageDataset(str(tmp_path))  # str roots work too
    assert ds.paths == ["grey.png", "tile_0.png", "tile_1.png", "tile_2.png"]
    grey = ds[0]
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [7, 7, 7]


def test_list_file_without_trailing_newline_and_blank_lines(nct_root: Path) -> None:
    (nct_root / "meta.txt").write_text("TUM/TUM-AAA.tif\n\nADI/ADI-BBB.tif")
    ds = PretrainImageDataset(nct_root, list_file="meta.txt")
    assert ds.paths == ["TUM/TUM-AAA.tif", "ADI/ADI-BBB.tif"]  # list order is kept
    assert np.asarray(ds[1])[0, 0].tolist() == [20, 20, 20]


def test_list_file_with_labels_ignores_them(nct_root: Path, tmp_path: Path) -> None:
    labelled = tmp_path / "train_labeled.txt"  # absolute path outside the root
    labelled.write_text("TUM/TUM-AAA.tif 8\nADI/ADI-BBB.tif\t1\n")
    ds = PretrainImageDataset(nct_root, list_file=labelled)
    assert ds.paths == ["TUM/TUM-AAA.tif", "ADI/ADI-BBB.tif"]
    assert isinstance(ds[0], Image.Image)  # an image, never an (image, label) pair


def test_transform_is_applied(nct_root: Path) -> None:
    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255

    ds = PretrainImageDataset(nct_root, transform=to_tensor)
    x = ds[2]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 10 / 255))


def test_works_with_generated_synthetic_set_and_dataloader(tmp_path: Path) -> None:
    root = write_pretrain_set(tmp_path / "syn", 6, size=32, seed=0)
    by_folder = PretrainImageDataset(root)
    by_list = PretrainImageDataset(root, list_file="train.txt")
    assert by_folder.paths == by_list.paths and len(by_list) == 6

    def to_tensor(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    by_list.transform = to_tensor
    batch = next(iter(torch.utils.data.DataLoader(by_list, batch_size=6)))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.uint8


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist.*make data.*datasets/README.md") as e:
        PretrainImageDataset(tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.tif").write_bytes(b"")
    with pytest.raises(DatasetError, match="is not a folder"):
        PretrainImageDataset(tmp_path / "file.tif")


def test_root_without_images_lists_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match="no images") as e:
        PretrainImageDataset(tmp_path)
    assert all(ext in str(e.value) for ext in IMAGE_EXTENSIONS)


def test_missing_list_file(nct_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"list file .*val\.txt does not exist"):
        PretrainImageDataset(nct_root, list_file="val.txt")


def test_empty_list_file(nct_root: Path) -> None:
    (nct_root / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="lists no images"):
        PretrainImageDataset(nct_root, list_file="empty.txt")


def test_list_entries_that_do_not_exist(nct_root: Path) -> None:
    missing = [f"DEB/DEB-{i}.tif" for i in range(5)]
    (nct_root / "bad.txt").write_text("\n".join(["ADI/ADI-BBB.tif", *missing]))
    with pytest.raises(DatasetError) as e:
        PretrainImageDataset(nct_root, list_file="bad.txt")
    msg = str(e.value)
    assert "5 of 6 entries" in msg
    assert all(m in msg for m in missing[:3]) and missing[3] not in msg
    assert "\n" not in msg


def test_corrupt_image_names_the_file_when_loaded(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", 1)
    (tmp_path / "broken.tif").write_bytes(b"this is not a tiff")
    ds = PretrainImageDataset(tmp_path)  # construction does not open images
    assert ds.paths == ["broken.tif", "good.png"]
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.tif") as e:
        ds[0]
    assert "\n" not in str(e.value)
    assert ds[1].size == (8, 8)


def test_truncated_image_raises_dataset_error(tmp_path: Path) -> None:
    _save(tmp_path / "full.png", 3, size=64)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    ds = PretrainImageDataset(tmp_path, list_file=None)
    with pytest.raises(DatasetError, match=r"cut\.png"):
        ds[ds.paths.index("cut.png")]


def test_classes_and_labels_come_from_the_class_folders(nct_root: Path) -> None:
    ds = PretrainImageDataset(nct_root)
    assert ds.classes == ["ADI", "TUM"]
    assert [ds.label(i) for i in range(len(ds))] == [0, 0, 1]  # ADI, ADI, TUM
    assert ds[0].mode == "RGB"  # items stay unlabelled: labels go through the loader


def test_classes_of_a_list_file_are_those_it_lists(nct_root: Path) -> None:
    (nct_root / "tum.txt").write_text("TUM/TUM-AAA.tif 8\n")  # a trailing label is ignored
    ds = PretrainImageDataset(nct_root, list_file="tum.txt")
    assert ds.classes == ["TUM"] and ds.label(0) == 0


def test_images_without_class_folders_are_refused_in_one_line_when_labels_are_asked(
    tmp_path: Path,
) -> None:
    _save(tmp_path / "TUM" / "a.png", 1)
    _save(tmp_path / "loose.png", 2)
    ds = PretrainImageDataset(tmp_path)  # unlabelled use is unaffected
    assert len(ds) == 2
    with pytest.raises(DatasetError, match="supervised method needs class folders") as e:
        _ = ds.classes
    assert "loose.png" in str(e.value) and "\n" not in str(e.value)
