"""Tests for the synthetic NCT-like patch generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.synthetic import (
    GENERATOR_VERSION,
    MARKER_NAME,
    TISSUE_TYPES,
    dominant_type,
    is_complete,
    render_patch,
    write_pretrain_set,
)
from tests.benchmark.data._render import assert_deterministic_and_seed_dependent

SIZE = 64  # small patches keep the suite fast; the recipes are size-independent


def _render(seed: int, index: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    return render_patch(np.random.default_rng([seed, index]), size)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tif"))}


def test_tissue_types_are_ncts_nine_classes() -> None:
    assert TISSUE_TYPES == ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def test_render_patch_shapes_and_dtypes() -> None:
    image, labels = _render(0, 0, size=96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert labels.shape == (96, 96) and np.issubdtype(labels.dtype, np.integer)
    assert labels.min() >= 0 and labels.max() < len(TISSUE_TYPES)


def test_render_patch_is_deterministic_and_seed_dependent() -> None:
    assert_deterministic_and_seed_dependent(_render, labels_differ=False)


def test_images_are_textured_not_flat() -> None:
    for index in range(6):
        image, labels = _render(0, index)
        # within a single region, pixels still vary (noise, nuclei, fibres)
        region = labels == dominant_type(labels)
        assert image[region].std(axis=0).max() > 3, index
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200


def test_most_patches_mix_several_tissue_types() -> None:
    counts = [len(np.unique(_render(1, i)[1])) for i in range(60)]
    assert np.mean([c >= 2 for c in counts]) >= 0.7
    assert max(counts) <= 4
    assert 1 in counts  # single-type patches exist too


def test_regions_are_contiguous_areas_not_speckle() -> None:
    _, labels = _render(0, 1, size=96)
    # neighbouring pixels almost always share a type: regions are large smooth areas
    same = (labels[1:, :] == labels[:-1, :]).mean()
    assert same > 0.95


def test_all_tissue_types_appear_as_dominant_type() -> None:
    dominant = {dominant_type(_render(2, i, size=32)[1]) for i in range(120)}
    assert dominant == set(range(len(TISSUE_TYPES)))


def _mean_blue_minus_red(seed: int, tissue: str, count: int = 80) -> float:
    """Mean B - R over pixels of the given tissue type, over patches where it covers > 30 %."""
    t = TISSUE_TYPES.index(tissue)
    values = []
    for i in range(count):
        image, labels = _render(seed, i, size=48)
        mask = labels == t
        if mask.mean() > 0.3:
            px = image[mask].astype(float)
            values.append((px[:, 2] - px[:, 0]).mean())
    assert len(values) >= 3, f"too few {tissue} patches to compare"
    return float(np.mean(values))


def test_he_colours_nuclei_are_bluer_than_stroma() -> None:
    # haematoxylin (nuclei, LYM) is blue-purple; eosin (stroma) is pink: B - R must separate them
    assert _mean_blue_minus_red(5, "LYM") > _mean_blue_minus_red(5, "STR") + 10


def test_he_colours_background_is_bright_and_tissue_darker() -> None:
    means = {}
    for i in range(80):
        image, labels = _render(6, i, size=48)
        for t in ("BACK", "LYM", "MUS"):
            mask = labels == TISSUE_TYPES.index(t)
            if mask.mean() > 0.3:
                means.setdefault(t, []).append(image[mask].mean())
    assert np.mean(means["BACK"]) > 200
    assert np.mean(means["LYM"]) < np.mean(means["BACK"]) - 40
    assert np.mean(means["MUS"]) < np.mean(means["BACK"]) - 25


def test_write_pretrain_set_layout_and_list(tmp_path: Path) -> None:
    root = write_pretrain_set(tmp_path / "syn", num_images=12, size=SIZE, seed=0)
    assert root == tmp_path / "syn"
    lines = (root / "train.txt").read_text().splitlines()
    assert len(lines) == 12 and lines == sorted(lines)
    assert {p.name for p in root.iterdir() if p.is_dir()} == set(TISSUE_TYPES)
    indices = set()
    for line in lines:
        cls, name = line.split("/")
        assert cls in TISSUE_TYPES
        assert name.startswith(f"{cls}-SYN") and name.endswith(".tif")
        index = int(name[len(cls) + 4 : -4])
        indices.add(index)
        with Image.open(root / line) as img:
            assert img.format == "TIFF" and img.mode == "RGB" and img.size == (SIZE, SIZE)
            pixels = np.asarray(img)
        # the file is exactly the rendered patch, filed under its dominant type
        expected, labels = _render(0, index)
        np.testing.assert_array_equal(pixels, expected)
        assert TISSUE_TYPES[dominant_type(labels)] == cls
    assert indices == set(range(12))
    assert len(list(root.rglob("*.tif"))) == 12
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker == {
        "num_images": 12,
        "size": SIZE,
        "seed": 0,
        "generator_version": GENERATOR_VERSION,
        "list_file": "train.txt",
    }
    assert is_complete(root, 12, SIZE, 0)
    assert not is_complete(root, 13, SIZE, 0)
    assert not is_complete(root, 12, SIZE, 1)
    assert not is_complete(tmp_path / "missing", 12, SIZE, 0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_write_is_deterministic_across_seeds_counts_and_workers(tmp_path: Path) -> None:
    a = _files(write_pretrain_set(tmp_path / "a", 8, size=32, seed=1))
    b = _files(write_pretrain_set(tmp_path / "b", 8, size=32, seed=1, workers=2))
    c = _files(write_pretrain_set(tmp_path / "c", 8, size=32, seed=2))
    d = _files(write_pretrain_set(tmp_path / "d", 5, size=32, seed=1))
    assert a == b  # identical bytes, whether written by one process or two
    assert a != c
    # a patch does not depend on how many others are generated
    assert d == {k: v for k, v in a.items() if int(k[-12:-4]) < 5}


def test_complete_set_is_not_regenerated(tmp_path: Path) -> None:
    root = write_pretrain_set(tmp_path / "syn", 4, size=32, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert write_pretrain_set(tmp_path / "syn", 4, size=32, seed=0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_different_parameters_raise_and_keep_data(tmp_path: Path) -> None:
    root = write_pretrain_set(tmp_path / "syn", 4, size=32, seed=0)
    before = _files(root)
    with pytest.raises(ValueError, match=r"seed=0.*rm -rf .*syn") as info:
        write_pretrain_set(root, 4, size=32, seed=1)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="num_images=4"):
        write_pretrain_set(root, 5, size=32, seed=0)
    assert _files(root) == before


def test_incomplete_folder_raises_and_is_not_deleted(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    (root / "ADI").mkdir(parents=True)
    (root / "ADI" / "ADI-SYN00000000.tif").write_bytes(b"partial")
    with pytest.raises(ValueError, match=r"not a complete synthetic set.*rm -rf") as info:
        write_pretrain_set(root, 4, size=32, seed=0)
    assert "\n" not in str(info.value)
    assert (root / "ADI" / "ADI-SYN00000000.tif").read_bytes() == b"partial"
    assert not is_complete(root, 4, 32, 0)


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    root.mkdir()
    write_pretrain_set(root, 3, size=32, seed=0)
    assert is_complete(root, 3, 32, 0)


def test_invalid_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_images"):
        write_pretrain_set(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="list_file"):
        write_pretrain_set(tmp_path / "x", 1, list_file="../train.txt")
    with pytest.raises(ValueError, match="size"):
        render_patch(np.random.default_rng(0), size=4)
    assert not (tmp_path / "x").exists()
