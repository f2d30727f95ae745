"""GlaS / CRAG as COCO instance segmentation: converters, checks and the fine-tuning dataset.

ConCL's transfer benchmark registers ``datasets/{GlaS,CRAG}/annotations/{train,test}.json`` with
images in ``datasets/{GlaS,CRAG}/{train,test}/`` (detectron2's ``register_coco_instances``). Those
jsons were Google-Drive downloads with no conversion script, so this module rebuilds them from the
raw releases: one "gland" category, and every distinct non-zero value of an annotation image is one
instance (a value split into several pieces stays one instance, as the release labels it). An
annotation without any instance is refused, naming the file: every GlaS and CRAG image shows
glands, so an all-zero map is a damaged or wrong file, and ``check_raw_*`` and ``check_dataset``
flag it too (prepare and check agree). A release left as its zip unpacks (one or two folders
below the data root) is found and announced.
Masks are RLE (``pycocotools.mask.encode``); area and bbox come from the RLE, so they agree with
what COCO evaluation computes. Annotation ids start at 1: pycocotools' matcher uses 0 for
"unmatched" (cocoapi #664). Already-converted folders are used as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from benchmark.core.errors import with_type as _one_line
from benchmark.data.markers import (
    publish,
    read_marker,
)
from benchmark.data.pretrain import IMAGE_EXTENSIONS, DatasetError

__all__ = [
    "CONVERTER_VERSION",
    "CocoInstances",
    "check_before_conversion",
    "check_dataset",
    "check_raw",
    "check_raw_crag",
    "check_raw_glas",
    "collate",
    "convert_crag",
    "convert_glas",
    "locate_release",
    "prepare_dataset",
    "read_instance_map",
    "train_image_count",
]

CONVERTER_VERSION = 1  # bump whenever the jsons a raw release produces change
CATEGORIES = [{"id": 1, "name": "gland"}]
SPLITS = ("train", "test")
_GLAS_IMAGE = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")
_GLAS_ANNO = re.compile(r"^(train|testA|testB)_(\d+)_anno\.bmp$")
_GLAS_SUBSETS = {"train": ("train",), "test": ("testA", "testB")}
_CRAG_SPLITS = {"train": "train", "test": "valid"}  # our split -> the release's folder
_BBOX_TOLERANCE = 0.5  # px: polygon-based jsons may put a box edge a little past the border
_README = "see datasets/README.md"


class _Pair(NamedTuple):
    split: str  # "train" or "test"
    subset: str  # GlaS: train / testA / testB; CRAG: train / valid
    image: Path
    anno: Path


def _numeric_key(path: Path) -> tuple[str, int, str]:
    """Sort ``train_2`` before ``train_10``: by prefix, then trailing number, then name."""
    match = re.match(r"^(.*?)(\d+)$", path.stem)
    if match is None:
        return (path.stem, -1, path.name)
    return (match.group(1), int(match.group(2)), path.name)


# --------------------------------------------------------------------------------------------------
# Reading annotation images
# --------------------------------------------------------------------------------------------------


def read_instance_map(path: Path) -> np.ndarray:
    """Instance ids of an annotation image as int64 (0 = background).

    Grey (8/16/32-bit) and palette images hold the ids directly (palette *indices*, not colours);
    an RGB image with distinct colours per gland gets one id per colour (black = background).
    """
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        arr = np.asarray(img)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.int64)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0]
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    if arr.ndim != 2:
        raise ValueError(f"annotation image has mode {mode} with shape {arr.shape}")
    return arr.astype(np.int64)


def _read_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image, decoding it fully so truncated files are caught."""
    with Image.open(path) as img:
        img.load()
        return img.height, img.width


# --------------------------------------------------------------------------------------------------
# Raw layouts
# --------------------------------------------------------------------------------------------------


def _glas_pairs(root: Path) -> tuple[list[_Pair], list[str]]:
    """Image/annotation pairs of a flat GlaS release, and layout problems (orphans)."""
    images: dict[tuple[str, int], Path] = {}
    annos: dict[tuple[str, int], Path] = {}
    for path in root.iterdir():
        if m := _GLAS_IMAGE.match(path.name):
            images[(m.group(1), int(m.group(2)))] = path
        elif m := _GLAS_ANNO.match(path.name):
            annos[(m.group(1), int(m.group(2)))] = path
    problems = [
        f"{images[k]}: no annotation {k[0]}_{k[1]}_anno.bmp" for k in images if k not in annos
    ]
    problems += [f"{annos[k]}: no image {k[0]}_{k[1]}.bmp" for k in annos if k not in images]
    order = {"train": 0, "testA": 1, "testB": 2}
    pairs = [
        _Pair("train" if k[0] == "train" else "test", k[0], images[k], annos[k])
        for k in sorted(images, key=lambda k: (order[k[0]], k[1]))
        if k in annos
    ]
    if not any(p.split == "train" for p in pairs):
        problems.append(f"{root}: no train_<i>.bmp images with train_<i>_anno.bmp")
    if not any(p.split == "test" for p in pairs):
        problems.append(f"{root}: no testA_<i>.bmp or testB_<i>.bmp images with annotations")
    return pairs, sorted(problems)


def _crag_pairs(root: Path) -> tuple[list[_Pair], list[str]]:
    """Image/annotation pairs of a CRAG release (``{train,valid}/{Images,Annotation}``)."""
    pairs: list[_Pair] = []
    problems: list[str] = []
    for split, folder in _CRAG_SPLITS.items():
        img_dir, ann_dir = root / folder / "Images", root / folder / "Annotation"
        missing = [d for d in (img_dir, ann_dir) if not d.is_dir()]
        if missing:
            problems += [f"{d}: folder missing" for d in missing]
            continue
        images = {p.stem: p for p in _image_files(img_dir)}
        annos = {p.stem: p for p in _image_files(ann_dir)}
        problems += [f"{images[s]}: no annotation in {ann_dir}" for s in images if s not in annos]
        problems += [f"{annos[s]}: no image in {img_dir}" for s in annos if s not in images]
        found = sorted((images[s] for s in images if s in annos), key=_numeric_key)
        if not found:
            problems.append(f"{img_dir}: no images with annotations")
        pairs += [_Pair(split, folder, p, annos[p.stem]) for p in found]
    return pairs, sorted(problems)


def _image_files(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]


def _is_glas(root: Path) -> bool:
    return root.is_dir() and any(_GLAS_ANNO.match(p.name) for p in root.iterdir())


def _is_crag(root: Path) -> bool:
    return (root / "train" / "Images").is_dir() and (root / "train" / "Annotation").is_dir()


def _is_coco(root: Path) -> bool:
    return all((root / "annotations" / f"{s}.json").is_file() for s in SPLITS)


def _read_or_note(path: Path, read: Callable[[Path], Any], what: str, problems: list[str]) -> Any:
    """``read(path)``, or None with a problem line when the file is empty or unreadable."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("empty file")
        return read(path)
    except (OSError, SyntaxError, ValueError) as exc:
        problems.append(f"{path}: unreadable {what} ({_one_line(exc)})")
        return None


def _check_pairs(pairs: Iterable[_Pair]) -> list[str]:
    """Per pair: both files readable and not empty, same size, at least one instance."""
    problems: list[str] = []
    for pair in pairs:
        size = _read_or_note(pair.image, _read_size, "image", problems)
        if size is None:
            continue
        ids = _read_or_note(pair.anno, read_instance_map, "annotation", problems)
        if ids is None:
            continue
        if ids.shape != size:
            problems.append(
                f"{pair.anno}: annotation is {ids.shape[1]}x{ids.shape[0]} px but image "
                f"{pair.image.name} is {size[1]}x{size[0]} px"
            )
        elif not ids.any():
            problems.append(f"{pair.anno}: no gland instance (all pixels are 0)")
    return problems


def check_raw_glas(root: Path) -> list[str]:
    """One-line problems of a raw GlaS folder (missing partners, unreadable files, image/mask size
    mismatches, masks without instances); an empty list means it converts cleanly."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    pairs, problems = _glas_pairs(root)
    return problems + _check_pairs(pairs)


def check_raw_crag(root: Path) -> list[str]:
    """As ``check_raw_glas``, for a raw CRAG folder."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    pairs, problems = _crag_pairs(root)
    return problems + _check_pairs(pairs)


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def _instances(ids: np.ndarray) -> list[dict[str, Any]]:
    """One COCO annotation body per distinct non-zero id, in increasing id order."""
    out = []
    for value in np.unique(ids):
        if value == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(ids == value, dtype=np.uint8))
        area = int(mask_utils.area(rle))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(
            {"category_id": 1, "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0}
        )
    return out


def _coco_json(images: list[dict], annotations: list[dict], dataset: str, split: str) -> dict:
    return {
        "info": {
            "description": f"{dataset} {split} as COCO instances (benchmark.data.coco)",
            "version": CONVERTER_VERSION,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def _fingerprint(pairs: list[_Pair]) -> str:
    """Names, sizes and modification times of the raw files: a regenerated or edited release
    no longer matches its old conversion (stat only, so checking it costs nothing)."""
    digest = hashlib.sha256()
    for pair in pairs:
        for path in (pair.image, pair.anno):
            st = path.stat()
            digest.update(f"{pair.split}/{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _wanted(dataset: str, raw_root: Path, pairs: list[_Pair]) -> dict[str, Any]:
    """The marker of a current conversion of ``pairs``."""
    return {
        "dataset": dataset,
        "source": str(Path(raw_root).resolve()),
        "fingerprint": _fingerprint(pairs),
        "converter_version": CONVERTER_VERSION,
    }


def _problems_error(dataset: str, problems: list[str]) -> DatasetError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return DatasetError(f"{problems[0]}{more}: fix the raw {dataset} folder, {_README}")


def check_before_conversion(name: str, root: Path, out_root: Path) -> None:
    """Raise the one-line DatasetError that converting the release at ``root`` (as found by
    ``locate_release``) into ``out_root`` would, before any work: layout problems, files that
    do not decode, size mismatches, annotations without gland. Nothing is decoded when
    ``out_root`` already holds the current conversion, or ``root`` is a COCO folder."""
    root = Path(root)
    if _is_coco(root):
        return
    key = name.lower()
    pairs, problems = (_glas_pairs if key == "glas" else _crag_pairs)(root)
    if not problems:
        if read_marker(Path(out_root)) == _wanted(key, root, pairs) and _is_coco(Path(out_root)):
            return
        problems = _check_pairs(pairs)
    if problems:
        raise _problems_error(key, problems)


def _convert(dataset: str, raw_root: Path, out_root: Path, scan) -> Path:
    raw_root, out_root = Path(raw_root), Path(out_root)
    if not raw_root.is_dir():
        raise DatasetError(f"{dataset} raw folder {raw_root} does not exist: {_README}")
    if out_root.resolve() == raw_root.resolve():
        raise DatasetError(
            f"output folder {out_root} is the raw {dataset} folder: choose another output folder"
        )
    pairs, problems = scan(raw_root)
    if problems:
        raise _problems_error(dataset, problems)
    wanted = _wanted(dataset, raw_root, pairs)
    stale = False
    if out_root.exists():
        found = read_marker(out_root)
        if found == wanted and _is_coco(out_root):
            return out_root
        # Our own earlier conversion (of other or since changed raw files) is a derived copy and
        # is replaced; anything else is never touched.
        stale = found is not None and found.get("dataset") == dataset and "fingerprint" in found
        if not stale and (not out_root.is_dir() or any(out_root.iterdir())):
            raise DatasetError(
                f"{out_root} exists but is not a {dataset} conversion made by this code: "
                "delete it or choose another output folder"
            )
    return publish(
        out_root,
        wanted,
        lambda tmp: _convert_into(tmp, dataset, pairs),
        lambda: read_marker(out_root) == wanted,
        replace_stale=stale,
    )


def _read_or_refuse(path: Path, read: Callable[[Path], Any], what: str, dataset: str) -> Any:
    """``read(path)``, or a one-line DatasetError naming exactly this file."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("empty file")
        return read(path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"cannot read {what} {path} ({_one_line(exc)}): replace it with the {dataset} "
            f"release's file, {_README}"
        ) from exc


def _convert_into(out: Path, dataset: str, pairs: list[_Pair]) -> None:
    (out / "annotations").mkdir()
    for split in SPLITS:
        (out / split).mkdir()
        images: list[dict] = []
        annotations: list[dict] = []
        for pair in (p for p in pairs if p.split == split):
            height, width = _read_or_refuse(pair.image, _read_size, "image", dataset)
            ids = _read_or_refuse(pair.anno, read_instance_map, "annotation", dataset)
            if ids.shape != (height, width):
                raise DatasetError(
                    f"{pair.anno} is {ids.shape[1]}x{ids.shape[0]} px but {pair.image.name} is "
                    f"{width}x{height} px: fix the raw {dataset} folder, {_README}"
                )
            if not ids.any():
                raise DatasetError(
                    f"{pair.anno}: no gland instance (all pixels are 0); every {dataset} image "
                    "shows glands, so the file is damaged or not an instance map: replace it "
                    f"with the release's file, or remove {pair.image.name} and its annotation, "
                    f"{_README}"
                )
            name = pair.image.name
            if (out / split / name).exists():
                raise DatasetError(f"two {split} images are called {name}: rename one, {_README}")
            shutil.copyfile(pair.image, out / split / name)
            record = {"id": len(images) + 1, "file_name": name, "height": height, "width": width}
            if split == "test" and dataset == "glas":
                record["subset"] = pair.subset
            images.append(record)
            for ann in _instances(ids):
                annotations.append({"id": len(annotations) + 1, "image_id": record["id"], **ann})
        _write_json(
            out / "annotations" / f"{split}.json", _coco_json(images, annotations, dataset, split)
        )
        if split == "test" and dataset == "glas":  # the challenge's two test parts, same ids
            for subset in _GLAS_SUBSETS["test"]:
                keep = {im["id"] for im in images if im["subset"] == subset}
                sub_images = [im for im in images if im["id"] in keep]
                sub_anns = [a for a in annotations if a["image_id"] in keep]
                _write_json(
                    out / "annotations" / f"{subset}.json",
                    _coco_json(sub_images, sub_anns, dataset, subset),
                )


def convert_glas(raw_root: Path, out_root: Path) -> Path:
    """Convert a flat GlaS release into ``out_root/annotations/{train,test,testA,testB}.json`` and
    copies of the images in ``out_root/{train,test}/``; returns ``out_root``.

    Test = testA + testB (ConCL registers one test set); each test image record carries
    ``"subset"``, and testA.json / testB.json hold the same records and ids. The output is built
    in a temporary sibling and renamed into place. A file that does not decode, an image and
    annotation of different sizes, or an annotation without gland stops it with a one-line
    DatasetError naming that file, and nothing is written. A complete conversion of the same,
    unchanged files is reused; an older conversion made by this code (of other or since
    regenerated raw files) is replaced; anything else at ``out_root`` raises ``DatasetError``.
    """
    return _convert("glas", raw_root, out_root, _glas_pairs)


def convert_crag(raw_root: Path, out_root: Path) -> Path:
    """Convert a CRAG release (``train/`` -> train, ``valid/`` -> test) like ``convert_glas``."""
    return _convert("crag", raw_root, out_root, _crag_pairs)


_LAYOUTS = {
    "glas": (
        "flat train_<i>.bmp + train_<i>_anno.bmp, testA_/testB_ likewise",
        _is_glas,
        convert_glas,
    ),
    "crag": (
        "train/Images, train/Annotation, valid/Images, valid/Annotation",
        _is_crag,
        convert_crag,
    ),
}


#: How deep below a data root a release is looked for: the Warwick QU zip unpacks to
#: ``Warwick QU Dataset (Released 2016_07_08)/``, CRAG's to ``CRAG/`` (``CRAG_v2/CRAG/``).
_SEARCH_DEPTH = 2
_SKIPPED_FOLDERS = ("__MACOSX",)  # macOS zip side folders of resource forks
_announced: set[tuple[str, str]] = set()


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in _SKIPPED_FOLDERS
        )
    except OSError:  # an unreadable folder holds no release we could use
        return []


def _nested_releases(root: Path, accept: Callable[[Path], bool], skip: Path | None) -> list[Path]:
    """Folders one, then two levels below ``root`` that ``accept``, the shallowest level that
    has any (``skip``, the conversion's own output, is never one)."""
    skipped = skip.resolve() if skip is not None else None
    level = [root]
    for _ in range(_SEARCH_DEPTH):
        level = [c for d in level for c in _subfolders(d) if c.resolve() != skipped]
        found = [c for c in level if accept(c)]
        if found:
            return found
    return []


def _announce(name: str, root: Path, found: Path) -> None:
    """One line (once per process, on the main rank) saying which folder a data root led to."""
    if (name, str(found)) in _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced.add((name, str(found)))
    print(f"==> {name}: using {found} (found below {root})", file=sys.stderr, flush=True)


def _set_root_hint(key: str) -> str:
    return f"finetune.{key}.raw_root=PATH (or `concl-bench data prepare {key} --raw-root PATH`)"


def locate_release(name: str, raw_root: Path, skip: Path | None = None) -> Path:
    """The folder that holds ``name``'s data under ``raw_root``: ``raw_root`` itself when it is a
    COCO folder or holds the raw layout, else the single such folder one or two levels down (a
    release left as its zip unpacks), announced in one line. ``skip`` is left out of the
    search (the conversion's output). Anything else is a one-line DatasetError."""
    key = name.lower()
    if key not in _LAYOUTS:
        raise DatasetError(f"unknown transfer dataset {name!r}: choose one of {sorted(_LAYOUTS)}")
    layout, detect, _ = _LAYOUTS[key]
    raw_root = Path(raw_root)
    if _is_coco(raw_root):
        return raw_root
    if not raw_root.is_dir():
        what = "is not a folder" if raw_root.exists() else "does not exist"
        raise DatasetError(
            f"{name} data root {raw_root} {what}: install the dataset there or set "
            f"{_set_root_hint(key)}, {_README}"
        )
    if detect(raw_root):
        return raw_root
    found = _nested_releases(raw_root, lambda p: _is_coco(p) or detect(p), skip)
    if len(found) == 1:
        _announce(name, raw_root, found[0])
        return found[0]
    if found:
        listed = ", ".join(str(p) for p in found[:3])
        raise DatasetError(
            f"{raw_root} holds {len(found)} {name} folders ({listed}): keep one, or choose one "
            f"with {_set_root_hint(key)}"
        )
    raise DatasetError(
        f"{raw_root} holds neither annotations/train.json + test.json nor the raw {name} layout "
        f"({layout}), here or {_SEARCH_DEPTH} levels down: move the release there or set "
        f"{_set_root_hint(key)}, {_README}"
    )


def check_raw(name: str, root: Path) -> list[str]:
    """``check_raw_glas`` or ``check_raw_crag`` by dataset name; nothing for a COCO folder (its
    problems are ``check_dataset``'s)."""
    root = Path(root)
    if _is_coco(root):
        return []
    return check_raw_glas(root) if name.lower() == "glas" else check_raw_crag(root)


def train_image_count(name: str, root: Path) -> int | None:
    """Training images a fine-tune can draw from the folder ``locate_release`` found: raw pairs,
    or the images with an instance in a COCO ``train.json``; None when that cannot be told
    without converting (the conversion then reports the problem)."""
    root = Path(root)
    if _is_coco(root):
        data, _ = _load_json(root / "annotations" / "train.json")
        if data is None:
            return None
        return len({a.get("image_id") for a in data["annotations"] if isinstance(a, dict)})
    scan = _glas_pairs if name.lower() == "glas" else _crag_pairs
    try:
        pairs, _ = scan(root)
    except OSError:
        return None
    return sum(p.split == "train" for p in pairs)


def prepare_dataset(name: str, raw_root: Path, out_root: Path) -> Path:
    """The COCO folder to fine-tune on: the folder ``locate_release`` finds under ``raw_root``
    if it already holds ``annotations/{train,test}.json`` (the ready-made "GlaS-coco-format"
    downloads), otherwise that raw release converted into ``out_root``."""
    root = locate_release(name, raw_root, skip=Path(out_root))
    if _is_coco(root):
        return root
    return _LAYOUTS[name.lower()][2](root, out_root)


# --------------------------------------------------------------------------------------------------
# Checking a prepared folder
# --------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path}: cannot load ({_one_line(exc)})"
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        return None, f"{path}: not a COCO instances file (needs images, annotations, categories)"
    return data, None


def _decode_rles(rles: list[dict]) -> np.ndarray:
    """(N, H, W) uint8 masks. pycocotools 2.0.x trips a NumPy 2 DeprecationWarning (``__array__``
    without ``copy``) on every decode; it is harmless and would flood logs and test output."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"__array__ implementation", category=DeprecationWarning
        )
        masks = mask_utils.decode(rles)
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


def _decode(segm: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segm, list):  # polygons
        if not segm or any(len(p) < 6 or len(p) % 2 for p in segm):
            raise ValueError("polygon with fewer than 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, *segm["size"])
    elif isinstance(segm, dict):
        rle = segm
    else:
        raise ValueError(f"unknown segmentation type {type(segm).__name__}")
    return _decode_rles([rle])[0]


def _check_split(root: Path, split: str) -> list[str]:
    path = root / "annotations" / f"{split}.json"
    if not path.is_file():
        return [f"{path}: missing"]
    data, error = _load_json(path)
    if data is None:
        return [error or f"{path}: cannot load"]
    problems: list[str] = []
    if not data["images"]:
        problems.append(f"{path}: no images")
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    images: dict[Any, dict] = {}
    no_size: set[Any] = set()  # unusable recorded size: nothing to check masks against
    wrong_size: set[Any] = set()  # file size differs: reported once, not once per mask
    names: set[str] = set()
    for record in data["images"]:
        if not isinstance(record, dict):
            problems.append(f"{path}: image entry {record!r:.40} is not an object")
            continue
        image_id, name = record.get("id"), record.get("file_name")
        where = root / split / str(name)
        if image_id in images:
            problems.append(f"{path}: image id {image_id} used twice")
            continue
        if name in names:
            problems.append(f"{where}: listed twice in {path}")
        names.add(name)
        images[image_id] = record
        height, width = record.get("height"), record.get("width")
        if not isinstance(height, int) or not isinstance(width, int) or height < 1 or width < 1:
            problems.append(f"{where}: bad recorded size {height}x{width} in {path}")
            no_size.add(image_id)
            continue
        if not where.is_file():
            problems.append(f"{where}: image file missing")
            continue
        if where.stat().st_size == 0:
            problems.append(f"{where}: empty file")
            continue
        try:
            real = _read_size(where)
        except (OSError, SyntaxError, ValueError) as exc:
            problems.append(f"{where}: unreadable image ({_one_line(exc)})")
            continue
        if real != (height, width):
            wrong_size.add(image_id)
            problems.append(
                f"{where}: image is {real[1]}x{real[0]} px but {path.name} records "
                f"width {width}, height {height}"
            )
    seen: set[Any] = set()
    counts = dict.fromkeys(images, 0)
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            problems.append(f"{path}: annotation entry {ann!r:.40} is not an object")
            continue
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        tag = f"{path}: annotation {ann_id}"
        if not isinstance(ann_id, int) or ann_id < 1:
            problems.append(f"{tag}: id must be an integer >= 1 (0 breaks COCO evaluation)")
        elif ann_id in seen:
            problems.append(f"{tag}: id used twice")
        seen.add(ann_id)
        record = images.get(image_id)
        if record is None:
            problems.append(f"{tag}: refers to unknown image id {image_id}")
            continue
        counts[image_id] += 1
        if ann.get("category_id") not in categories:
            problems.append(f"{tag}: unknown category {ann.get('category_id')}")
        if image_id in no_size:
            continue
        height, width = record["height"], record["width"]
        where = f"{tag} ({record.get('file_name')})"
        area = ann.get("area")
        if not isinstance(area, (int, float)) or area <= 0:
            problems.append(f"{where}: area {area} is not positive")
        bbox = ann.get("bbox")
        numbers = isinstance(bbox, list) and all(isinstance(v, (int, float)) for v in bbox)
        if not (numbers and len(bbox) == 4):
            problems.append(f"{where}: bbox {bbox} is not [x, y, w, h]")
        else:
            x, y, w, h = bbox
            tol = _BBOX_TOLERANCE
            if w <= 0 or h <= 0:
                problems.append(f"{where}: bbox {bbox} has no extent")
            elif x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
                problems.append(f"{where}: bbox {bbox} leaves the {width}x{height} image")
        if image_id in wrong_size:
            continue
        try:
            mask = _decode(ann.get("segmentation"), height, width)
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"{where}: segmentation does not decode ({_one_line(exc)})")
            continue
        if mask.shape[:2] != (height, width):
            problems.append(
                f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} px, image {width}x{height}"
            )
        elif not mask.any():
            problems.append(f"{where}: mask is empty")
    for image_id, count in counts.items():
        if count == 0:
            name = images[image_id].get("file_name")
            problems.append(f"{root / split / str(name)}: no gland instance in {path.name}")
    return problems


def check_dataset(root: Path) -> list[str]:
    """One-line problems of a prepared COCO folder (``annotations/{train,test}.json`` and image
    folders ``train/``, ``test/``), each naming the file; an empty list means it is usable.

    Checked: the jsons load; images are listed, exist, decode (truncated files are caught) and
    have the recorded size; annotation ids are unique and >= 1; boxes lie inside the image (within
    0.5 px); areas are positive; masks decode to the image size and are not empty; every image
    has an instance (train images without one are skipped in training)."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    return [p for split in SPLITS for p in _check_split(root, split)]


# --------------------------------------------------------------------------------------------------
# The fine-tuning dataset
# --------------------------------------------------------------------------------------------------


def _load_coco(path: Path) -> COCO:
    """pycocotools' COCO without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


class CocoInstances(Dataset):
    """Images and instance targets of one split of a COCO folder, in torchvision detection format.

    Items are ``(image, target)``: image float32 C x H x W RGB in [0, 1]; target ``boxes`` float32
    (N, 4) XYXY in pixels (a box spans its pixels, x2 = x + w), ``labels`` int64 ones, ``masks``
    uint8 (N, H, W) and ``image_id``. With ``train=True`` images without instances are skipped
    (detectron2's FILTER_EMPTY_ANNOTATIONS), crowd regions are dropped, and a horizontal flip is
    applied with p = 0.5 from torch's RNG, so seeding torch (and the workers) reproduces it.
    """

    def __init__(self, root: Path, split: str, train: bool) -> None:
        self.root = Path(root)
        self.split = split
        self.train = train
        self.image_dir = self.root / split
        path = self.root / "annotations" / f"{split}.json"
        if not path.is_file():
            raise DatasetError(
                f"{path} does not exist: prepare the dataset first (prepare_dataset), {_README}"
            )
        try:
            self.coco = _load_coco(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"cannot load {path} ({_one_line(exc)}): re-create it") from exc
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if self._annotations(i)]
        if not ids:
            raise DatasetError(f"{path} has no usable images: check it with check_dataset")
        self.ids: list[int] = ids

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0)] if self.train else anns

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        record = self.coco.imgs[image_id]
        path = self.image_dir / record["file_name"]
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(
                f"cannot read image {path} ({_one_line(exc)}): replace it, or check the folder "
                "with check_dataset"
            ) from exc
        height, width = pixels.shape[:2]
        anns = [a for a in self._annotations(image_id) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
        ).reshape(-1, 4)
        if anns:
            masks = torch.from_numpy(_decode_rles([self.coco.annToRLE(a) for a in anns]))
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        if masks.shape[1:] != (height, width):
            raise DatasetError(
                f"{path} is {width}x{height} px but its masks are "
                f"{masks.shape[2]}x{masks.shape[1]}: check the folder with check_dataset"
            )
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            masks = masks.flip(-1)
            boxes = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            )
        target = {
            "boxes": boxes,
            "labels": torch.ones(len(anns), dtype=torch.int64),
            "masks": masks.to(torch.uint8).contiguous(),
            "image_id": int(image_id),
        }
        return image, target

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(root={str(self.root)!r}, split={self.split!r}, {len(self)} images)"


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list, list]:
    """Keep images and targets as lists: detection models take images of different sizes."""
    return [image for image, _ in batch], [target for _, target in batch]
