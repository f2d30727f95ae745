"""Tests for the GlaS / CRAG -> COCO converters, the folder checks and the fine-tuning dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from benchmark.data.coco import (
    CocoInstances,
    check_dataset,
    check_raw_crag,
    check_raw_glas,
    collate,
    convert_crag,
    convert_glas,
    prepare_dataset,
    read_instance_map,
)
from benchmark.data.glands import write_crag_raw, write_glas_raw
from benchmark.data.pretrain import DatasetError

H, W = 96, 128
# pycocotools 2.0.x on NumPy 2 warns on every decode (harmless; the module silences its own calls)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def glas_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glas_raw(tmp_path_factory.mktemp("raw") / "GlaS", 4, 2, 1, H, W, seed=0)


@pytest.fixture(scope="module")
def glas_coco(glas_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_glas(glas_raw, tmp_path_factory.mktemp("coco") / "GlaS")


@pytest.fixture(scope="module")
def crag_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_crag_raw(tmp_path_factory.mktemp("raw") / "CRAG", 3, 2, H, W, seed=0)


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def _by_hand(ids: np.ndarray) -> list[tuple[list[float], int]]:
    """(bbox XYWH, area) of every instance, from pixel coordinates, in increasing id order."""
    out = []
    for value in sorted(set(np.unique(ids).tolist()) - {0}):
        ys, xs = np.nonzero(ids == value)
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        out.append(([float(v) for v in box], len(xs)))
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def _save_glas(root: Path, name: str, ids: np.ndarray, mode: str = "L") -> None:
    root.mkdir(parents=True, exist_ok=True)
    rgb = np.full((*ids.shape, 3), 200, np.uint8)
    Image.fromarray(rgb).save(root / f"{name}.bmp")
    anno = Image.fromarray(ids.astype(np.uint8))
    if mode == "P":
        anno = anno.convert("P")
    anno.save(root / f"{name}_anno.bmp")


def _tiny_glas(root: Path, empty_test: bool = False) -> Path:
    """Hand-made GlaS: one value split in two pieces, one palette annotation, a one-pixel
    gland in testB_1 (or no gland at all with ``empty_test``)."""
    a = np.zeros((20, 30), np.uint8)
    a[2:5, 3:7] = 7  # one gland in two disconnected pieces
    a[10:12, 20:29] = 7
    a[14:18, 1:4] = 3
    _save_glas(root, "train_1", a)
    b = np.zeros((20, 30), np.uint8)
    b[0:20, 0:2] = 1
    _save_glas(root, "train_2", b, mode="P")
    _save_glas(root, "testA_1", a)
    c = np.zeros((20, 30), np.uint8)
    if not empty_test:
        c[19, 29] = 5
    _save_glas(root, "testB_1", c)
    return root


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def test_glas_conversion_matches_the_label_maps(glas_raw: Path, glas_coco: Path) -> None:
    train, test = _json(glas_coco, "train"), _json(glas_coco, "test")
    assert [im["file_name"] for im in train["images"]] == [f"train_{i}.bmp" for i in range(1, 5)]
    assert [im["file_name"] for im in test["images"]] == ["testA_1.bmp", "testA_2.bmp",
                                                          "testB_1.bmp"]  # fmt: skip
    assert train["categories"] == [{"id": 1, "name": "gland"}]
    for data, folder in ((train, "train"), (test, "test")):
        assert [im["id"] for im in data["images"]] == list(range(1, len(data["images"]) + 1))
        assert [a["id"] for a in data["annotations"]] == list(
            range(1, len(data["annotations"]) + 1)
        )  # annotation ids start at 1: 0 means "unmatched" to pycocotools
        for im in data["images"]:
            ids = read_instance_map(glas_raw / im["file_name"].replace(".bmp", "_anno.bmp"))
            assert (im["height"], im["width"]) == ids.shape == (H, W)
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            assert len(anns) == len(np.unique(ids)) - 1  # one instance per distinct id
            assert [(a["bbox"], a["area"]) for a in anns] == _by_hand(ids)
            for a, value in zip(anns, sorted(set(np.unique(ids).tolist()) - {0}), strict=True):
                assert a["iscrowd"] == 0 and a["category_id"] == 1
                assert isinstance(a["segmentation"]["counts"], str)
                np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]), ids == value)
            copied = glas_coco / folder / im["file_name"]
            assert copied.read_bytes() == (glas_raw / im["file_name"]).read_bytes()
    assert (glas_raw / "train_1.bmp").is_file()  # copied, not moved


def test_glas_test_parts_are_recoverable(glas_coco: Path) -> None:
    test = _json(glas_coco, "test")
    assert [im["subset"] for im in test["images"]] == ["testA", "testA", "testB"]
    parts = {s: _json(glas_coco, s) for s in ("testA", "testB")}
    assert [im["file_name"] for im in parts["testB"]["images"]] == ["testB_1.bmp"]
    merged_images = parts["testA"]["images"] + parts["testB"]["images"]
    merged_anns = parts["testA"]["annotations"] + parts["testB"]["annotations"]
    assert merged_images == test["images"]  # same records and ids as test.json
    assert sorted(merged_anns, key=lambda a: a["id"]) == test["annotations"]


def test_coco_files_load_with_pycocotools(glas_coco: Path) -> None:
    ds = CocoInstances(glas_coco, "test", train=False)
    coco = ds.coco
    assert coco.getCatIds() == [1]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert coco.annToMask(ann).shape == (H, W)


def test_disconnected_pieces_stay_one_instance_and_palette_ids_are_read(tmp_path: Path) -> None:
    out = convert_glas(_tiny_glas(tmp_path / "raw"), tmp_path / "coco")
    train = _json(out, "train")
    first = [a for a in train["annotations"] if a["image_id"] == 1]
    assert [a["area"] for a in first] == [12, 12 + 18]  # id 3, then id 7 (two pieces)
    assert first[1]["bbox"] == [3.0, 2.0, 26.0, 10.0]
    second = [a for a in train["annotations"] if a["image_id"] == 2]
    assert [(a["bbox"], a["area"]) for a in second] == [([0.0, 0.0, 2.0, 20.0], 40)]
    test = _json(out, "test")
    assert [im["file_name"] for im in test["images"]] == ["testA_1.bmp", "testB_1.bmp"]
    last = test["annotations"][-1]
    assert (last["image_id"], last["bbox"], last["area"]) == (2, [29.0, 19.0, 1.0, 1.0], 1)
    assert check_dataset(out) == []


def test_an_annotation_without_gland_is_refused_by_prepare_as_by_the_checks(
    tmp_path: Path,
) -> None:
    """Every GlaS and CRAG image shows glands: an all-zero map is a broken file, and prepare,
    the raw check and the prepared check all say so, naming it (datasets/README.md)."""
    raw = _tiny_glas(tmp_path / "raw", empty_test=True)
    anno = raw / "testB_1_anno.bmp"
    assert check_raw_glas(raw) == [f"{anno}: no gland instance (all pixels are 0)"]
    with pytest.raises(DatasetError) as info:
        convert_glas(raw, tmp_path / "coco")
    msg = _one_line(info)
    assert msg.startswith(f"{anno}: no gland instance (all pixels are 0)")
    assert "replace it" in msg and "remove testB_1.bmp" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no partial folder


def test_an_unreadable_file_is_named_alone(tmp_path: Path) -> None:
    raw = _tiny_glas(tmp_path / "raw")
    data = (raw / "train_2.bmp").read_bytes()
    (raw / "train_2.bmp").write_bytes(data[: len(data) // 2])  # truncated image
    with pytest.raises(DatasetError) as info:
        convert_glas(raw, tmp_path / "coco")
    msg = _one_line(info)
    assert msg.startswith(f"cannot read image {raw / 'train_2.bmp'} (")
    assert "_anno" not in msg and "replace it" in msg
    (raw / "train_2.bmp").write_bytes(data)
    (raw / "testA_1_anno.bmp").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        convert_glas(raw, tmp_path / "coco")
    msg = _one_line(info)
    assert msg.startswith(f"cannot read annotation {raw / 'testA_1_anno.bmp'} (ValueError: empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_crag_conversion(crag_raw: Path, tmp_path: Path) -> None:
    out = convert_crag(crag_raw, tmp_path / "CRAG")
    train, test = _json(out, "train"), _json(out, "test")
    assert [im["file_name"] for im in train["images"]] == ["train_1.png", "train_2.png",
                                                           "train_3.png"]  # fmt: skip
    assert [im["file_name"] for im in test["images"]] == ["test_1.png", "test_2.png"]
    assert "subset" not in test["images"][0]
    for im in test["images"]:
        ids = read_instance_map(crag_raw / "valid" / "Annotation" / im["file_name"])
        anns = [a for a in test["annotations"] if a["image_id"] == im["id"]]
        assert [(a["bbox"], a["area"]) for a in anns] == _by_hand(ids)
    assert sorted(p.name for p in (out / "test").iterdir()) == ["test_1.png", "test_2.png"]
    assert check_dataset(out) == []


def test_crag_16_bit_annotations_and_numeric_order(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for split, stem in (("train", "train"), ("valid", "test")):
        (raw / split / "Images").mkdir(parents=True)
        (raw / split / "Annotation").mkdir(parents=True)
        for i in (10, 2):
            ids = np.zeros((12, 16), np.uint16)
            ids[1:4, 1:5] = 300
            ids[6:10, 8:15] = 1000 + i
            Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(
                raw / split / "Images" / f"{stem}_{i}.png"
            )
            Image.fromarray(ids).save(raw / split / "Annotation" / f"{stem}_{i}.png")
    assert check_raw_crag(raw) == []
    out = prepare_dataset("CRAG", raw, tmp_path / "coco")
    train = _json(out, "train")
    assert [im["file_name"] for im in train["images"]] == ["train_2.png", "train_10.png"]
    assert [a["area"] for a in train["annotations"]] == [12, 28, 12, 28]


def test_existing_conversion_is_reused_and_other_content_refused(
    glas_raw: Path, glas_coco: Path, tmp_path: Path
) -> None:
    stamp = (glas_coco / "annotations" / "train.json").stat().st_mtime_ns
    assert convert_glas(glas_raw, glas_coco) == glas_coco
    assert (glas_coco / "annotations" / "train.json").stat().st_mtime_ns == stamp
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(DatasetError) as info:
        convert_glas(glas_raw, busy)
    assert "delete it or choose another" in _one_line(info)
    assert (busy / "keep.txt").read_text() == "x"
    with pytest.raises(DatasetError) as info:
        convert_glas(glas_raw, glas_raw)
    assert "is the raw glas folder" in _one_line(info)


def test_conversion_of_changed_raw_files_is_replaced(tmp_path: Path) -> None:
    raw = _tiny_glas(tmp_path / "raw")
    out = convert_glas(raw, tmp_path / "coco")
    assert len(_json(out, "train")["annotations"]) == 3
    ids = np.zeros((20, 30), np.uint8)
    ids[5:9, 5:9] = 4
    Image.fromarray(ids).save(raw / "train_2_anno.bmp")  # the release was regenerated
    assert convert_glas(raw, out) == out
    second = [a for a in _json(out, "train")["annotations"] if a["image_id"] == 2]
    assert [(a["bbox"], a["area"]) for a in second] == [([5.0, 5.0, 4.0, 4.0], 16)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "raw"]  # nothing left behind


# --------------------------------------------------------------------------------------------------
# prepare_dataset and raw-layout errors
# --------------------------------------------------------------------------------------------------


def test_prepare_accepts_a_converted_folder_as_is(glas_coco: Path, tmp_path: Path) -> None:
    assert prepare_dataset("glas", glas_coco, tmp_path / "unused") == glas_coco
    assert not (tmp_path / "unused").exists()


def test_prepare_converts_raw_layouts(glas_raw: Path, crag_raw: Path, tmp_path: Path) -> None:
    out = prepare_dataset("glas", glas_raw, tmp_path / "g")
    assert out == tmp_path / "g" and check_dataset(out) == []
    assert prepare_dataset("crag", crag_raw, tmp_path / "c") == tmp_path / "c"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders


def test_prepare_errors_are_one_line(glas_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        prepare_dataset("kumar", glas_raw, tmp_path / "o")
    assert "'crag', 'glas'" in _one_line(info)
    with pytest.raises(DatasetError) as info:
        prepare_dataset("glas", tmp_path / "missing", tmp_path / "o")
    assert "does not exist" in _one_line(info) and "datasets/README.md" in str(info.value)
    assert "finetune.glas.raw_root=PATH" in str(info.value) and "--raw-root PATH" in str(info.value)
    wrong = tmp_path / "wrong"
    (wrong / "images").mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        prepare_dataset("crag", wrong, tmp_path / "o")
    msg = _one_line(info)
    assert "train/Images" in msg and "datasets/README.md" in msg
    twice = tmp_path / "twice"
    shutil.copytree(glas_raw, twice / "a")
    shutil.copytree(glas_raw, twice / "b")
    with pytest.raises(DatasetError) as info:
        prepare_dataset("glas", twice, tmp_path / "o")
    msg = _one_line(info)
    assert f"holds 2 glas folders ({twice / 'a'}, {twice / 'b'})" in msg and "--raw-root" in msg
    assert not (tmp_path / "o").exists()


def test_releases_left_as_they_unzip_are_found_and_announced(
    glas_raw: Path, crag_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    glas = tmp_path / "GlaS"
    release = glas / "Warwick QU Dataset (Released 2016_07_08)"
    shutil.copytree(glas_raw, release)
    (glas / "__MACOSX" / "x").mkdir(parents=True)  # zip side folders are not candidates
    out = prepare_dataset("glas", glas, tmp_path / "prepared" / "GlaS")
    assert out == tmp_path / "prepared" / "GlaS" and check_dataset(out) == []
    assert json.loads((out / ".complete").read_text())["source"] == str(release.resolve())
    err = capsys.readouterr().err.splitlines()
    assert err == [f"==> glas: using {release} (found below {glas})"]
    assert prepare_dataset("glas", glas, out) == out  # reused, and announced only once
    assert capsys.readouterr().err == ""
    crag = tmp_path / "CRAG"
    shutil.copytree(crag_raw, crag / "CRAG_v2" / "CRAG")  # two levels down
    assert prepare_dataset("crag", crag, tmp_path / "c") == tmp_path / "c"
    assert f"using {crag / 'CRAG_v2' / 'CRAG'}" in capsys.readouterr().err
    coco = tmp_path / "coco-download"
    shutil.copytree(out, coco / "GlaS-coco-format")  # a nested COCO folder is used as it is
    assert prepare_dataset("glas", coco, tmp_path / "unused") == coco / "GlaS-coco-format"
    assert not (tmp_path / "unused").exists()


def test_raw_problems_are_found_and_stop_conversion(glas_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(glas_raw, raw)
    assert check_raw_glas(raw) == []
    (raw / "train_3_anno.bmp").unlink()
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(raw / "train_4_anno.bmp")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(raw / "testA_1_anno.bmp")
    problems = check_raw_glas(raw)
    assert problems == [
        f"{raw / 'train_3.bmp'}: no annotation train_3_anno.bmp",
        f"{raw / 'train_4_anno.bmp'}: annotation is {W + 1}x{H} px but image train_4.bmp is "
        f"{W}x{H} px",
        f"{raw / 'testA_1_anno.bmp'}: no gland instance (all pixels are 0)",
    ]
    with pytest.raises(DatasetError) as info:
        convert_glas(raw, tmp_path / "out")
    assert "train_3.bmp: no annotation" in _one_line(info)
    (raw / "train_3.bmp").unlink()
    with pytest.raises(DatasetError) as info:
        convert_glas(raw, tmp_path / "out")
    assert "train_4_anno.bmp is 129x96 px" in _one_line(info)
    assert not (tmp_path / "out").exists()
    assert check_raw_crag(tmp_path / "nothing") == [f"{tmp_path / 'nothing'}: not a folder"]


# --------------------------------------------------------------------------------------------------
# check_dataset
# --------------------------------------------------------------------------------------------------


def test_check_dataset_finds_planted_problems(glas_coco: Path, tmp_path: Path) -> None:
    assert check_dataset(glas_coco) == []
    root = tmp_path / "bad"
    shutil.copytree(glas_coco, root)
    (root / "train" / "train_1.bmp").unlink()
    data = (root / "train" / "train_2.bmp").read_bytes()
    (root / "train" / "train_2.bmp").write_bytes(data[: len(data) // 2])  # truncated
    (root / "test" / "testB_1.bmp").write_bytes(b"")
    train = _json(root, "train")
    train["images"][2]["height"] = H + 5  # train_3.bmp
    train["annotations"][-1]["area"] = 0
    last = train["annotations"][-1]
    last_file = next(im for im in train["images"] if im["id"] == last["image_id"])["file_name"]
    train["annotations"][0]["bbox"][2] = W + 40
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    problems = check_dataset(root)
    assert all("\n" not in p for p in problems)

    def about(text: str) -> list[str]:
        return [p for p in problems if text in p]

    assert about(f"{root / 'train' / 'train_1.bmp'}: image file missing")
    assert about(f"{root / 'train' / 'train_2.bmp'}: unreadable image")
    assert about(f"{root / 'train' / 'train_3.bmp'}: image is {W}x{H} px but train.json records")
    assert about(f"{root / 'test' / 'testB_1.bmp'}: empty file")
    assert about(f"annotation {last['id']} ({last_file}): area 0 is not positive")
    assert about("annotation 1 (train_1.bmp): bbox") and about("leaves the 128x96 image")
    assert len(problems) == 6


def test_check_dataset_json_problems(glas_coco: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(glas_coco, root)
    (root / "annotations" / "test.json").write_text("{not json")
    train = _json(root, "train")
    train["annotations"][0]["id"] = 0
    train["annotations"][2]["id"] = train["annotations"][1]["id"]
    wrong = np.zeros((H + 1, W), np.uint8)
    wrong[3, 3] = 1
    rle = mask_utils.encode(np.asfortranarray(wrong))
    rle["counts"] = rle["counts"].decode("ascii")
    train["annotations"][3]["segmentation"] = rle  # a mask of another size
    train["annotations"][4]["segmentation"] = 17  # not a segmentation at all
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    problems = check_dataset(root)
    assert any("test.json: cannot load" in p for p in problems)
    assert any("annotation 0: id must be an integer >= 1" in p for p in problems)
    assert any(f"annotation {train['annotations'][1]['id']}: id used twice" in p for p in problems)
    ann3, ann4 = train["annotations"][3]["id"], train["annotations"][4]["id"]
    assert any(f"annotation {ann3} (" in p and f"mask is {W}x{H + 1} px" in p for p in problems)
    assert any(f"annotation {ann4} (" in p and "does not decode" in p for p in problems)
    assert check_dataset(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a folder"]


# --------------------------------------------------------------------------------------------------
# CocoInstances
# --------------------------------------------------------------------------------------------------


def test_dataset_items_match_the_label_maps(glas_raw: Path, glas_coco: Path) -> None:
    ds = CocoInstances(glas_coco, "train", train=False)
    assert ds.ids == [1, 2, 3, 4] and len(ds) == 4
    image, target = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert image.min() >= 0.0 and image.max() <= 1.0
    with Image.open(glas_raw / "train_2.bmp") as img:
        pixels = np.asarray(img)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), pixels / 255.0, atol=1e-6)
    ids = read_instance_map(glas_raw / "train_2_anno.bmp")
    values = sorted(set(np.unique(ids).tolist()) - {0})
    assert target["image_id"] == 2
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1] * len(values)
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(values), H, W)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(values), 4)
    for box, mask, value in zip(target["boxes"], target["masks"], values, strict=True):
        np.testing.assert_array_equal(mask.numpy(), ids == value)
        ys, xs = np.nonzero(ids == value)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # XYXY


def test_training_flip_moves_boxes_with_masks(glas_coco: Path) -> None:
    plain = CocoInstances(glas_coco, "train", train=False)
    ds = CocoInstances(glas_coco, "train", train=True)
    ref_image, ref = plain[0]
    flipped = kept = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = ds[0]
        torch.manual_seed(seed)
        again, _ = ds[0]
        assert torch.equal(image, again)  # torch's RNG decides the flip
        if torch.equal(image, ref_image):
            kept += 1
            assert torch.equal(target["boxes"], ref["boxes"])
            continue
        flipped += 1
        assert torch.equal(image, ref_image.flip(-1))
        assert torch.equal(target["masks"], ref["masks"].flip(-1))
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            ys, xs = np.nonzero(mask.numpy())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert flipped and kept


def test_empty_images_are_skipped_in_training_only(tmp_path: Path) -> None:
    """A ready-made COCO folder may list an image without instances (prepare never writes
    one): training skips it, evaluation keeps it."""
    out = convert_glas(_tiny_glas(tmp_path / "raw"), tmp_path / "coco")
    test = _json(out, "test")
    test["annotations"] = [a for a in test["annotations"] if a["image_id"] != 2]
    (out / "annotations" / "test.json").write_text(json.dumps(test))
    assert CocoInstances(out, "test", train=True).ids == [1]  # testB_1 has no gland now
    test = CocoInstances(out, "test", train=False)
    assert test.ids == [1, 2]
    image, target = test[1]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 20, 30)
    assert target["labels"].shape == (0,) and image.shape == (3, 20, 30)
    images, targets = collate([test[0], test[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == 2


def test_dataset_errors_are_one_line(glas_coco: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        CocoInstances(tmp_path, "train", train=True)
    assert "prepare_dataset" in _one_line(info)
    root = tmp_path / "copy"
    shutil.copytree(glas_coco, root)
    (root / "train" / "train_1.bmp").write_bytes(b"garbage")
    with pytest.raises(DatasetError) as info:
        CocoInstances(root, "train", train=False)[0]
    assert "train_1.bmp" in _one_line(info)


def test_check_before_conversion_raises_what_conversion_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmark.data import coco

    raw = _tiny_glas(tmp_path / "raw", empty_test=True)
    with pytest.raises(DatasetError) as info:
        coco.check_before_conversion("glas", raw, tmp_path / "coco")
    assert _one_line(info).startswith(f"{raw / 'testB_1_anno.bmp'}: no gland instance")
    _tiny_glas(raw)  # the file replaced
    coco.check_before_conversion("glas", raw, tmp_path / "coco")
    out = convert_glas(raw, tmp_path / "coco")
    monkeypatch.setattr(coco, "_check_pairs", lambda pairs: pytest.fail("decoded again"))
    coco.check_before_conversion("glas", raw, out)  # current conversion: nothing decoded
    coco.check_before_conversion("glas", out, tmp_path / "unused")  # a COCO folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "raw"]
