"""Tests for the synthetic GlaS-like / CRAG-like gland generator and its raw release layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.glands import (
    GENERATOR_VERSION,
    GLAS_GRADE_HEADER,
    GLAS_SPLITS,
    MIN_GLAND_AREA,
    render_gland_image,
    write_crag_raw,
    write_glas_raw,
)
from tests.benchmark.data._render import assert_deterministic_and_seed_dependent

H, W = 96, 128  # small images keep the suite fast; gland sizes scale with the image


def _render(seed: int, index: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    return render_gland_image(np.random.default_rng([seed, 0, index]), h, w)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_render_shapes_dtypes_and_instance_ids() -> None:
    for index in range(6):
        image, labels = _render(0, index)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert labels.shape == (H, W) and labels.dtype == np.int32
        ids = np.unique(labels)
        assert ids[0] == 0 and labels.max() >= 1
        np.testing.assert_array_equal(ids[1:], np.arange(1, labels.max() + 1))  # 1..N, no gaps
        assert np.bincount(labels.ravel())[1:].min() >= MIN_GLAND_AREA


def test_render_is_deterministic_and_seed_dependent() -> None:
    assert_deterministic_and_seed_dependent(_render, labels_differ=True)


def test_glands_touch_are_cut_by_the_border_and_vary_in_size() -> None:
    touching = border = 0
    areas = []
    for index in range(10):
        _, labels = _render(1, index)
        for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
            touching += int(((a != b) & (a > 0) & (b > 0)).any())  # two glands share a border
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        border += len(np.unique(edge[edge > 0]))
        areas += np.bincount(labels.ravel())[1:].tolist()
    assert touching >= 3
    assert border >= 10
    assert max(areas) > 8 * min(areas)


def test_glands_look_like_glands_not_flat_blobs() -> None:
    """Textured (nuclei, fibres), H&E coloured (red above green), and a gland's boundary band
    (its nuclei row) darker than its interior (lumen) on average."""
    band, interior = [], []
    for index in range(8):
        image, labels = _render(2, index, 128, 160)
        grey = image.astype(float).mean(axis=2)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2000
        assert image[..., 0].mean() > image[..., 1].mean()  # pink/purple, not grey or green
        stroma = labels == 0
        assert grey[stroma].std() > 8
        inside = labels > 0
        # erode the gland mask: pixels >= 6 px from its outline form the interior
        core = inside.copy()
        for _ in range(6):
            shrunk = core.copy()
            shrunk[1:] &= core[:-1]
            shrunk[:-1] &= core[1:]
            shrunk[:, 1:] &= core[:, :-1]
            shrunk[:, :-1] &= core[:, 1:]
            core = shrunk
        rim = inside & ~core
        band.append(grey[rim].mean())
        interior.append(grey[core].mean() if core.any() else np.nan)
    assert np.nanmean(interior) - np.mean(band) > 8


def test_small_images_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        render_gland_image(np.random.default_rng(0), 8, 64)


def test_write_glas_raw_layout_grades_and_annotations(tmp_path: Path) -> None:
    root = write_glas_raw(tmp_path / "GlaS", 3, 2, 1, H, W, seed=5)
    assert root == tmp_path / "GlaS"
    names = sorted(p.name for p in root.iterdir())
    expected = [f"{s}_{i}{suffix}" for s, n in (("train", 3), ("testA", 2), ("testB", 1))
                for i in range(1, n + 1) for suffix in (".bmp", "_anno.bmp")]  # fmt: skip
    assert names == sorted([".complete", "Grade.csv", *expected])
    with Image.open(root / "train_2.bmp") as img:
        assert (img.format, img.mode, img.size) == ("BMP", "RGB", (W, H))
    with Image.open(root / "train_2_anno.bmp") as anno:
        assert (anno.format, anno.mode, anno.size) == ("BMP", "L", (W, H))
        ids = np.asarray(anno)
    # the file holds exactly what the generator rendered for (seed, split, index)
    rng = np.random.default_rng([5, GLAS_SPLITS["train"], 2])
    malignant = bool(rng.random() < 0.55)
    image, labels = render_gland_image(rng, H, W, malignant=malignant)
    np.testing.assert_array_equal(ids, labels)
    with Image.open(root / "train_2.bmp") as img:
        np.testing.assert_array_equal(np.asarray(img), image)
    rows = list(csv.reader((root / "Grade.csv").open()))
    assert tuple(rows[0]) == GLAS_GRADE_HEADER
    assert [r[0] for r in rows[1:]] == ["train_1", "train_2", "train_3", "testA_1", "testA_2",
                                        "testB_1"]  # fmt: skip
    grades = {r[0]: r[2] for r in rows[1:]}
    assert grades["train_2"] == ("malignant" if malignant else "benign")
    assert set(grades.values()) <= {"benign", "malignant"}
    assert all(r[1].isdigit() for r in rows[1:])
    marker = json.loads((root / ".complete").read_text())
    assert marker["generator_version"] == GENERATOR_VERSION and marker["seed"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders


def test_write_crag_raw_layout(tmp_path: Path) -> None:
    root = write_crag_raw(tmp_path / "CRAG", 2, 2, H, W, seed=1)
    assert sorted(p.name for p in (root / "train" / "Images").iterdir()) == [
        "train_1.png",
        "train_2.png",
    ]
    assert sorted(p.name for p in (root / "valid" / "Annotation").iterdir()) == [
        "test_1.png",
        "test_2.png",
    ]
    with Image.open(root / "valid" / "Images" / "test_2.png") as img:
        assert (img.mode, img.size) == ("RGB", (W, H))
    with Image.open(root / "valid" / "Annotation" / "test_2.png") as anno:
        ids = np.asarray(anno)
    assert ids.shape == (H, W) and ids.max() >= 1
    assert np.bincount(ids.ravel())[1:].min() >= MIN_GLAND_AREA


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_glas_raw(tmp_path / "a", 2, 1, 1, H, W, seed=0)
    b = write_glas_raw(tmp_path / "b", 2, 1, 1, H, W, seed=0, workers=2)  # workers: speed only
    c = write_glas_raw(tmp_path / "c", 2, 1, 1, H, W, seed=1)
    assert _files(a) == _files(b)
    assert _files(a)["train_1.bmp"] != _files(c)["train_1.bmp"]
    d = write_crag_raw(tmp_path / "d", 2, 1, H, W, seed=0)
    e = write_crag_raw(tmp_path / "e", 2, 1, H, W, seed=0)
    assert _files(d) == _files(e)


def test_complete_set_is_reused_and_other_content_is_refused(tmp_path: Path) -> None:
    root = write_glas_raw(tmp_path / "GlaS", 1, 1, 1, H, W)
    stamp = (root / "train_1.bmp").stat().st_mtime_ns
    assert write_glas_raw(root, 1, 1, 1, H, W) == root
    assert (root / "train_1.bmp").stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(ValueError, match=r"seed=0.*rm -rf") as info:
        write_glas_raw(root, 1, 1, 1, H, W, seed=9)
    assert "\n" not in str(info.value)
    assert (root / "train_1.bmp").stat().st_mtime_ns == stamp  # never deleted
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="interrupted run"):
        write_crag_raw(user, 1, 1, H, W)
    assert (user / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_crag_raw(empty, 1, 0, H, W) == empty  # an empty folder is filled
    assert (empty / "train" / "Images" / "train_1.png").is_file()


def test_bad_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="training image"):
        write_glas_raw(tmp_path / "g", 0, 1, 1, H, W)
    with pytest.raises(ValueError, match="at least 16"):
        write_crag_raw(tmp_path / "c", 1, 1, 10, W)
    assert not (tmp_path / "g").exists() and not (tmp_path / "c").exists()
