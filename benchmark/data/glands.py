"""Deterministic synthetic GlaS-like and CRAG-like gland images in the raw release layouts.

Why it exists: the transfer benchmark (Mask R-CNN gland detection on GlaS and CRAG) must run end to
end in tests, CI and the CPU demo without the real releases, and through the *same* code path: the
files written here look like the releases on disk (GlaS: flat ``train_1.bmp`` +
``train_1_anno.bmp`` + ``Grade.csv``; CRAG: ``train/Images`` + ``train/Annotation``), so the COCO
converter in ``benchmark.data.coco`` is exercised exactly as with real data.

The pictures are built to be learnable but not trivial, since a set of plain ellipses on a flat
background saturates a detector within a few hundred iterations and then ranks nothing:

* glands are warped, Fourier-perturbed ellipses (malignant ones multi-lobed, with thick stratified
  epithelium and irregular or absent lumens) lined by a row of haematoxylin nuclei around a pale,
  often secretion-filled lumen;
* many glands touch: overlapping shapes are split along the line where their normalised distances
  are equal, so neighbours share a border with only a faint seam, and the instance map decides who
  owns each pixel; others are cut by the image border or by the edge of the tissue;
* the stroma is fibrous eosin with scattered and clustered nuclei, plus hard negatives (vessels with
  red cells and a thin endothelium, clefts) that look like lumens but are not glands;
* per image stain vectors and strengths, fading, blur and sensor noise vary contrast.

Everything is a function of a ``numpy.random.Generator`` seeded per image with
``default_rng([seed, split_id, index])``, so an image is bit-identical whatever else is generated.
Sizes are drawn in GlaS pixels (522 px short side, 0.62 um/px) and scaled with the image, so the
demo's 192 x 256 images look like a downscaled GlaS field; a floor keeps glands detectable.
"""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from benchmark.data.markers import publish, read_marker, refuse_existing
from benchmark.data.pretrain import DatasetError
from benchmark.data.synthetic import (
    _E_REF,
    _H_REF,
    _available_cpus,
    _blur,
    _grid_noise,
    _nearest,
    _noise_at,
    _rotate,
    _soft,
    _unit,
)

__all__ = [
    "CRAG_SPLITS",
    "GENERATOR_VERSION",
    "GLAS_GRADE_HEADER",
    "GLAS_SPLITS",
    "MIN_GLAND_AREA",
    "render_gland_image",
    "write_crag_raw",
    "write_glas_raw",
]

GENERATOR_VERSION = 1  # bump whenever the pixels a seed produces change
MIN_GLAND_AREA = 30  # px; smaller slivers (border cuts) are dropped from image and label map
# split name -> split_id of the per-image seed; GlaS and CRAG ids differ so that the same seed
# never gives the two datasets the same random stream.
GLAS_SPLITS: dict[str, int] = {"train": 0, "testA": 1, "testB": 2}
CRAG_SPLITS: dict[str, int] = {"train": 10, "valid": 11}
GLAS_GRADE_HEADER = ("name", "patient ID", "grade (GlaS)", "grade (Sirinukunwattana et al. 2015)")
_GLAS_SHORT_SIDE = 522  # sizes below are in GlaS pixels at this short side
_CRAG_SHORT_SIDE = 1000  # CRAG's 1512 px field is wider: glands are a smaller share of it
# Downscaled CRAG fields would hold dozens of glands of a few pixels; small images keep glands at
# least as large as in a GlaS field at this scale (or at GlaS scale, if that is smaller).
_CRAG_MIN_SCALE = 0.3
_MIN_RADIUS = 6.0  # px, whatever the scale: smaller glands would be a few blurry pixels
_BENIGN_GRADES = ("healthy", "adenomatous")
_MALIGNANT_GRADES = (
    "moderately differentiated",
    "moderately-to-poorly differentated",  # sic, as spelt in the release
    "poorly differentiated",
)
_PARALLEL_MIN_PIXELS = 40_000_000  # below this a process pool costs more than it saves

_F32 = np.float32
Array = np.ndarray


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:height, 0:width].astype(_F32)
    xx.setflags(write=False)  # cached and shared between calls
    yy.setflags(write=False)
    return xx, yy


def _smooth(rng: np.random.Generator, height: int, width: int, wavelength: float) -> Array:
    """Unit-variance smooth noise on an ``height`` x ``width`` grid (wavelength in px)."""
    size = max(height, width)
    cells = int(min(size, max(1, round(size / max(wavelength, 1.0)))))
    return _grid_noise(rng, size, cells)[:height, :width]


def _fbm(
    rng: np.random.Generator, height: int, width: int, wavelength: float, octaves: int = 3
) -> Array:
    """Fractal noise: octaves of halving wavelength and amplitude, about unit variance."""
    total = _smooth(rng, height, width, wavelength).copy()
    weight = 1.0
    for o in range(1, octaves):
        total += 0.5**o * _smooth(rng, height, width, wavelength / 2**o)
        weight += 0.25**o
    return total / np.float32(np.sqrt(weight))


# --------------------------------------------------------------------------------------------------
# Gland layout: shapes, placement and the instance label map
# --------------------------------------------------------------------------------------------------


class _Gland(NamedTuple):
    lobes: list[tuple[float, float, float, float, float]]  # (cx, cy, semi-axis a, b, angle)
    harmonics: Array  # (k, amplitude, phase) rows: radius factor 1 + sum a cos(k theta + phase)
    radius: float  # mean radius in px (placement, epithelium thickness, nuclei frame)
    thickness: float  # epithelium thickness in px (>= radius: a solid nest without lumen)
    malignant: bool


def _make_gland(
    rng: np.random.Generator, cx: float, cy: float, r: float, malignant: bool
) -> _Gland:
    aspect = _u(rng, 1.0, 2.4) if malignant else _u(rng, 1.0, 1.6)
    angle = _u(rng, -np.pi, np.pi)
    lobes = [(cx, cy, r * np.sqrt(aspect), r / np.sqrt(aspect), angle)]
    if malignant and rng.random() < 0.45:  # irregular, branching outlines
        for _ in range(int(rng.integers(1, 3))):
            direction = _u(rng, -np.pi, np.pi)
            off = r * _u(rng, 0.55, 0.95)
            lr = r * _u(rng, 0.4, 0.7)
            la = _u(rng, 1.0, 2.0)
            lobes.append(
                (
                    cx + off * np.cos(direction),
                    cy + off * np.sin(direction),
                    lr * np.sqrt(la),
                    lr / np.sqrt(la),
                    _u(rng, -np.pi, np.pi),
                )
            )
    ks = np.arange(2, 7, dtype=np.float64)
    sigma = 0.11 if malignant else 0.05
    amps = rng.normal(0.0, sigma, ks.size) / ks**0.7
    amps *= min(1.0, 0.4 / max(np.abs(amps).sum(), 1e-9))  # radius factor stays in [0.6, 1.4]
    harmonics = np.stack([ks, amps, rng.uniform(-np.pi, np.pi, ks.size)], axis=1)
    if malignant:
        roll = rng.random()
        frac = 1.3 if roll < 0.15 else _u(rng, 0.35, 0.7)  # some solid nests, thick epithelium
    else:
        frac = 1.3 if rng.random() < 0.07 else _u(rng, 0.26, 0.42)  # tangential cuts: no lumen
    return _Gland(lobes, harmonics, r, max(2.5, frac * r), malignant)


def _place_glands(
    rng: np.random.Generator, height: int, width: int, scale: float, malignant: bool
) -> list[_Gland]:
    """Dart-throwing placement to a target coverage; some glands are put against a neighbour on
    purpose (touching), some centres lie near or beyond the border (cut glands)."""
    lo, hi = (45.0, 120.0) if malignant else (38.0, 78.0)
    base = max(_MIN_RADIUS, scale * _u(rng, lo, hi))
    spread = 0.35 if malignant else 0.22
    coverage = _u(rng, 0.28, 0.55)
    p_touch = _u(rng, 0.2, 0.5) if malignant else _u(rng, 0.1, 0.35)
    glands: list[_Gland] = []
    centres: list[tuple[float, float, float]] = []
    covered = 0.0
    area = float(height * width)
    for _ in range(300):
        if covered >= coverage * area or len(glands) >= 200:
            break
        r = max(_MIN_RADIUS, base * float(np.exp(rng.normal(0.0, spread))))
        touch = bool(centres) and rng.random() < p_touch
        if touch:
            jx, jy, jr = centres[int(rng.integers(len(centres)))]
            direction = _u(rng, -np.pi, np.pi)
            reach = (jr + r) * _u(rng, 0.78, 0.95)
            cx, cy = jx + reach * np.cos(direction), jy + reach * np.sin(direction)
        else:
            cx = _u(rng, -0.4 * r, width + 0.4 * r)
            cy = _u(rng, -0.4 * r, height + 0.4 * r)
        gap = _u(rng, 1.0, 1.25)
        clash = False
        for ox, oy, orad in centres:
            dist = np.hypot(cx - ox, cy - oy)
            limit = (orad + r) * (0.75 if touch else gap)
            if dist < limit and not (touch and (ox, oy, orad) == (jx, jy, jr)):
                clash = True
                break
        if clash:
            continue
        glands.append(_make_gland(rng, cx, cy, r, malignant))
        centres.append((cx, cy, r))
        covered += np.pi * r * r * 0.8  # border cuts and overlaps: count a bit less
    return glands


def _harmonic_factor(theta: Array, harmonics: Array) -> Array:
    out = np.ones_like(theta)
    for k, amp, phase in harmonics:
        out += _F32(amp) * np.cos(_F32(k) * theta + _F32(phase))
    return out


class _Layout(NamedTuple):
    labels: Array  # int32 instance map, 0 = background
    depth: Array  # px from the pixel to its gland's boundary (own outline or a shared border)
    owner: Array  # index into glands of the owning gland (-1 outside)
    angle: Array  # polar angle (0..2 pi) around the owner's centre: the frame of nuclei rows
    dist: Array  # px from the owner's centre


def _layout(glands: list[_Gland], xw: Array, yw: Array, tissue: Array, min_area: int) -> _Layout:
    """Nearest and second-nearest gland per pixel in normalised distance: the nearest owns the
    pixel; where two overlap, the border is where both distances are equal (a shared border)."""
    height, width = xw.shape
    inf = _F32(np.inf)
    d1 = np.full((height, width), inf, _F32)
    d2 = np.full((height, width), inf, _F32)
    r1 = np.ones((height, width), _F32)
    r2 = np.ones((height, width), _F32)
    owner = np.full((height, width), -1, np.int32)
    angle_map = np.zeros((height, width), _F32)
    dist_map = np.zeros((height, width), _F32)
    pad = 0.0
    if xw.size:
        xx, yy = _grid(height, width)
        pad = float(max(np.abs(xw - xx).max(), np.abs(yw - yy).max())) + 2.0
    for gi, g in enumerate(glands):
        for cx, cy, a, b, angle in g.lobes:
            reach = max(a, b) * 1.45 + pad
            y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
            x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
            if y0 >= y1 or x0 >= x1:
                continue
            dx = xw[y0:y1, x0:x1] - _F32(cx)
            dy = yw[y0:y1, x0:x1] - _F32(cy)
            u, v = _rotate(dx, dy, angle)
            na, nb = u / _F32(a), v / _F32(b)
            rho = np.sqrt(na * na + nb * nb)
            theta = np.arctan2(nb, na)
            d = rho / _harmonic_factor(theta, g.harmonics)
            length = np.sqrt(dx * dx + dy * dy)
            ray = np.where(d > 0.05, length / np.maximum(d, 1e-3), _F32(np.sqrt(a * b)))
            # Polar frame around the main body's centre (lobes share it, so rows join up).
            mx, my = g.lobes[0][0], g.lobes[0][1]
            ox, oy = xw[y0:y1, x0:x1] - _F32(mx), yw[y0:y1, x0:x1] - _F32(my)
            ang = np.arctan2(oy, ox) + _F32(np.pi)
            dist = np.sqrt(ox * ox + oy * oy)
            s1, s2 = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
            q1, q2 = r1[y0:y1, x0:x1], r2[y0:y1, x0:x1]
            o1, a1, l1 = owner[y0:y1, x0:x1], angle_map[y0:y1, x0:x1], dist_map[y0:y1, x0:x1]
            same = o1 == gi  # another lobe of the same gland: keep the smaller distance
            better = d < s1
            new_first = better & ~same
            # demote the old first to second where a different gland takes over
            np.copyto(s2, s1, where=new_first)
            np.copyto(q2, q1, where=new_first)
            # a different gland that does not win may still be the closest runner-up
            runner = ~better & ~same & (d < s2)
            np.copyto(s2, d, where=runner)
            np.copyto(q2, ray, where=runner)
            np.copyto(s1, d, where=better)
            np.copyto(q1, ray, where=better)
            np.copyto(o1, np.int32(gi), where=better)
            np.copyto(a1, ang, where=better)
            np.copyto(l1, dist, where=better)
    inside = (d1 < 1.0) & tissue
    labels = np.where(inside, owner + 1, 0).astype(np.int32)
    # Drop slivers (border and tissue-edge cuts), renumber 1..N in placement order.
    counts = np.bincount(labels.ravel(), minlength=len(glands) + 1)
    keep = counts >= min_area
    keep[0] = False
    remap = np.zeros(len(glands) + 1, np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = remap[labels]
    own = (1.0 - d1) * r1
    both = np.isfinite(d2)  # d2 finite implies d1 finite
    shared = np.full_like(d1, inf)
    shared[both] = (d2[both] - d1[both]) / (1.0 / r1[both] + 1.0 / r2[both])
    depth = np.minimum(own, shared)
    depth = np.where(labels > 0, depth, np.minimum(depth, _F32(-1.0)))
    owner = np.where(labels > 0, owner, -1)
    return _Layout(labels, depth.astype(_F32), owner, angle_map, dist_map)


# --------------------------------------------------------------------------------------------------
# Painting: haematoxylin (H) and eosin (E) optical densities, then Beer-Lambert RGB
# --------------------------------------------------------------------------------------------------


def _nuclei_row(
    rng: np.random.Generator,
    frame: tuple[Array, Array, Array],
    depth: Array,
    thick: Array,
    *,
    spacing: float,
    centre: float,
    jitter: float,
    half_t: float,
    half_r: Array,
    keep: float,
) -> Array:
    """One row of nuclei parallel to the gland outline at ``centre`` x epithelial thickness from
    the basement membrane: slots ``spacing`` px apart along the row, each with its own radial
    jitter, size and presence (per-slot attributes are a gather, not a loop over nuclei).

    ``frame`` is (angle, distance from the centre, owning gland). Slots are cut in arc length at
    the row's own radius (the outline's radius minus the row's depth), not at the pixel's, so
    they stay radial instead of shearing into spirals."""
    angle, dist, owner = frame
    if angle.size == 0:
        return np.zeros(0, _F32)
    row_radius = np.maximum(dist + depth - _F32(centre) * thick, _F32(spacing))
    t = angle * row_radius / _F32(spacing)
    slot = np.floor(t)
    per_gland = int(slot.max()) + 1
    idx = slot.astype(np.intp) + owner.astype(np.intp) * per_gland  # distinct slots per gland
    n = (int(owner.max()) + 1) * per_gland
    shift = (rng.random(n).astype(_F32) - 0.5) * _F32(2 * jitter)
    size = rng.uniform(0.75, 1.25, n).astype(_F32)
    there = rng.random(n) < keep
    across = (t - slot - 0.5) * _F32(spacing) / (_F32(half_t) * size[idx])
    radial = (depth - (centre + shift[idx]) * thick) / (half_r * size[idx])
    dist_n = np.sqrt(across * across + radial * radial)
    shade = (0.85 + 0.3 * rng.random(n).astype(_F32))[idx]
    return _soft(dist_n, half_t, 1.0) * there[idx] * shade


def _paint_glands(
    rng: np.random.Generator,
    lay: _Layout,
    glands: list[_Gland],
    scale: float,
    h: Array,
    e: Array,
    height: int,
    width: int,
) -> None:
    """Epithelium (cytoplasm, nuclei rows, goblet vacuoles) and lumen, in place on h and e."""
    sel = np.flatnonzero(lay.labels.ravel() > 0)
    if sel.size == 0:
        return
    depth = lay.depth.ravel()[sel]
    owner = lay.owner.ravel()[sel]
    frame = (lay.angle.ravel()[sel], lay.dist.ravel()[sel], owner)
    n = len(glands)
    thick_g = np.array([g.thickness for g in glands], _F32)
    malig_g = np.array([g.malignant for g in glands], bool)
    wobble = 1.0 + 0.25 * _fbm(rng, height, width, max(6.0, 30.0 * scale), 2).ravel()[sel]
    thick = thick_g[owner] * np.where(malig_g[owner], wobble, 1.0 + 0.25 * (wobble - 1.0))
    # Cribriform bridges in some malignant glands: epithelium crossing the lumen.
    bridges = _smooth(rng, height, width, max(4.0, 18.0 * scale)).ravel()[sel]
    cribriform = (rng.random(n) < 0.35)[owner] & malig_g[owner]
    inside = np.clip(depth + 0.5, 0.0, 1.0)
    epi = np.clip(thick - depth + 0.5, 0.0, 1.0)
    epi = np.maximum(epi, cribriform * np.clip((bridges - 0.6) * 3.0, 0.0, 1.0))
    epi *= inside
    lumen = inside - epi
    nuc_scale = max(scale, 0.3)
    spacing = max(1.8, 5.5 * nuc_scale)
    half_r = np.minimum(np.maximum(1.0, thick * 0.2), max(1.2, 5.0 * nuc_scale))
    basal = _nuclei_row(
        rng, frame, depth, thick, spacing=spacing, centre=0.28, jitter=0.06,
        half_t=spacing * 0.36, half_r=half_r, keep=0.9,
    )  # fmt: skip
    # Malignant glands: crowded, stratified, pleomorphic nuclei anywhere in the epithelium.
    xs = (sel % width).astype(_F32)
    ys = (sel // width).astype(_F32)
    cell = max(2.2, 8.5 * nuc_scale)
    crowd = _nearest(
        rng, xs, ys, (cell, cell), (cell * 0.5, cell * 0.3), presence=0.85, jitter=1.0,
        radius_jitter=0.25,
    )  # fmt: skip
    pleo = rng.uniform(0.7, 1.3, crowd.count).astype(_F32)[crowd.index]
    nuclei = np.where(malig_g[owner], _soft(crowd.dist, cell * 0.3, 1.0) * pleo, basal)
    goblet = _nuclei_row(
        rng, frame, depth, thick, spacing=spacing * 1.7, centre=0.68, jitter=0.08,
        half_t=spacing * 0.6, half_r=np.maximum(1.0, thick * 0.22), keep=0.8,
    )  # fmt: skip
    goblet = np.where(malig_g[owner], 0.2 * goblet, goblet) * epi
    # per-gland stain uptake: some glands are faint
    uptake = rng.uniform(0.7, 1.15, n).astype(_F32)[owner]
    cyto_e = _u(rng, 0.22, 0.42) * (1.0 - 0.7 * goblet) * uptake
    cyto_h = _u(rng, 0.08, 0.18) * (1.0 - 0.4 * goblet) + 0.06 * goblet
    cyto_h = cyto_h + malig_g[owner] * _u(rng, 0.05, 0.15)  # hyperchromatic, amphophilic
    nuc_h = _u(rng, 0.9, 1.7) * nuclei * epi * uptake
    # Lumen: clear, or filled with pink secretion (then it contrasts little with the stroma), or
    # (malignant) with necrotic debris.
    kind = rng.choice(3, n, p=(0.45, 0.4, 0.15))
    level = np.where(kind == 0, 0.0, np.where(kind == 1, 0.18, 0.32)) * rng.uniform(0.6, 1.3, n)
    texture = _fbm(rng, height, width, max(4.0, 14.0 * scale), 2).ravel()[sel]
    secretion = level.astype(_F32)[owner] * np.clip(0.6 + 0.6 * texture, 0.0, 1.3)
    debris = malig_g[owner] * (rng.random(n) < 0.4)[owner]
    cell = max(2.5, 9.0 * nuc_scale)
    specks = _nearest(rng, xs, ys, (cell, cell), (cell * 0.22, cell * 0.22), presence=0.5)
    speck = _soft(specks.dist, cell * 0.22, 1.0) * debris
    lum_e = 0.03 + secretion + 0.15 * debris * np.clip(wobble - 0.9, 0.0, 1.0)
    lum_h = 0.015 + 0.12 * secretion + 1.1 * speck
    mix = 1.0 - inside  # antialiased outline: keep the stroma painted underneath
    np.put(h, sel, mix * h.ravel()[sel] + epi * (cyto_h + nuc_h) + lumen * lum_h)
    np.put(e, sel, mix * e.ravel()[sel] + epi * cyto_e + lumen * lum_e)


def _paint_stroma(
    rng: np.random.Generator, height: int, width: int, scale: float, xw: Array, yw: Array
) -> tuple[Array, Array]:
    """Fibrous eosin stroma with spindle and round nuclei, denser in inflamed patches."""
    s = max(scale, 0.3)
    u, v = _rotate(xw, yw, _u(rng, 0.0, np.pi))
    fibre_len, fibre_w = max(4.0, 28.0 * s), max(1.0, 3.0 * s)
    tex = 0.65 * _noise_at(rng, (u / fibre_len).ravel(), (v / fibre_w).ravel()).reshape(u.shape)
    tex += 0.35 * _smooth(rng, height, width, max(3.0, 10.0 * s))
    loose = _fbm(rng, height, width, max(8.0, 60.0 * scale), 2)
    e = _u(rng, 0.2, 0.42) * np.clip(0.75 + 0.25 * tex - 0.2 * np.clip(loose, 0, None), 0.1, None)
    h = np.full((height, width), _u(rng, 0.04, 0.09), _F32) + 0.02 * loose
    xs, ys = xw.ravel(), yw.ravel()
    cell = max(3.5, 16.0 * s)
    rad = max(0.9, 2.6 * s)
    lymph = _nearest(rng, xs, ys, (cell, cell), (rad, rad), presence=_u(rng, 0.2, 0.5))
    inflamed = _fbm(rng, height, width, max(10.0, 70.0 * scale), 2).ravel() > _u(rng, 0.7, 1.6)
    dense_cell = max(2.6, 7.5 * s)
    crowd = _nearest(rng, xs, ys, (dense_cell, dense_cell), (rad, rad), presence=0.65)
    uu, vv = u.ravel(), v.ravel()
    spindle = _nearest(
        rng, uu, vv, (max(5.0, 30.0 * s), max(3.0, 14.0 * s)), (max(1.5, 6.5 * s), rad * 0.7),
        presence=_u(rng, 0.25, 0.6), angle_jitter=0.15,
    )  # fmt: skip
    nuc = np.maximum(_soft(lymph.dist, rad, 1.0), _soft(crowd.dist, rad, 1.0) * inflamed)
    nuc = np.maximum(nuc, 0.8 * _soft(spindle.dist, rad * 0.7, 1.0))
    h += (_u(rng, 0.9, 1.6) * nuc).reshape(height, width)
    return h, e.astype(_F32)


def _paint_vessels(
    rng: np.random.Generator, labels: Array, scale: float, h: Array, e: Array
) -> None:
    """Hard negatives in the stroma, never painted over a gland: vessels (pale lumen, thin dark
    endothelium, red cells), and gland-sized fat vacuoles and clefts. They look like lumens but
    lack the epithelial lining, so white blobs alone do not find glands."""
    height, width = labels.shape
    xx, yy = _grid(height, width)
    stroma = labels == 0
    count_small, count_big = int(rng.integers(0, 6)), int(rng.integers(0, 4))
    for k in range(count_small + count_big):
        big = k >= count_small
        r = max(3.0, scale * (_u(rng, 20.0, 65.0) if big else _u(rng, 8.0, 30.0)))
        cx, cy = _u(rng, 0, width), _u(rng, 0, height)
        aspect = _u(rng, 1.0, 3.5)
        y0, y1 = max(0, int(cy - 2 * r)), min(height, int(cy + 2 * r) + 1)
        x0, x1 = max(0, int(cx - 2 * r)), min(width, int(cx + 2 * r) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        a, b = _rotate(xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy, _u(rng, 0, np.pi))
        minor = r / np.sqrt(aspect)
        d = np.sqrt((a / (r * np.sqrt(aspect))) ** 2 + (b / minor) ** 2)
        d = d * (1.0 + 0.08 * _smooth(rng, y1 - y0, x1 - x0, max(3.0, r / 2)))
        lumen = _soft(d, minor, 1.0) * stroma[y0:y1, x0:x1]
        wall = np.clip(1.0 - np.abs(d - 1.0) * minor / 1.2, 0.0, 1.0) * stroma[y0:y1, x0:x1]
        hb, eb = h[y0:y1, x0:x1], e[y0:y1, x0:x1]
        roll = rng.random()
        if not big and roll < 0.6:  # vessel: red cells in a pale lumen, thin dark endothelium
            rbc = _smooth(rng, y1 - y0, x1 - x0, max(2.0, 3.0 * scale)) > 0.3
            fill = _u(rng, 0.0, 1.0)
            hb[:] = hb * (1 - lumen) + lumen * 0.02 + wall * _u(rng, 0.3, 0.8)
            eb[:] = eb * (1 - lumen) + lumen * (0.05 + 0.9 * fill * rbc)
        elif big and roll < 0.5:  # fat vacuole: empty, with a thin pink membrane
            hb[:] = hb * (1 - lumen) + lumen * 0.01
            eb[:] = eb * (1 - lumen) + lumen * 0.02 + wall * _u(rng, 0.2, 0.5)
        else:  # cleft or tear: empty
            hb[:] = hb * (1 - lumen) + lumen * 0.01
            eb[:] = eb * (1 - lumen) + lumen * 0.02


def _stain_rgb(rng: np.random.Generator, h: Array, e: Array, grey: Array) -> Array:
    """Beer-Lambert with per-image stain vectors and strengths, fading (low contrast), section
    thickness, scanner blur and sensor noise; the rectangular cousin of synthetic's renderer."""
    height, width = h.shape
    h_vec = _unit(_H_REF + rng.normal(0.0, 0.06, 3)).astype(_F32)
    e_vec = _unit(_E_REF + rng.normal(0.0, 0.06, 3)).astype(_F32)
    h_gain, e_gain = (float(g) for g in rng.uniform(0.65, 1.3, 2))
    fade = _u(rng, 0.65, 1.05)
    thickness = 1.0 + 0.12 * _smooth(rng, height, width, max(height, width) / 2.0)
    od = (h * (h_gain * fade) * thickness)[..., None] * h_vec
    od += (e * (e_gain * fade) * thickness)[..., None] * e_vec
    od += (grey * 0.9)[..., None]
    white = 255.0 * (1.0 - _u(rng, 0.02, 0.08) - rng.uniform(0.0, 0.03, 3)).astype(_F32)
    rgb = white * np.exp(-od)
    rgb = _blur(rgb, _u(rng, 0.55, 1.2))
    rgb += _u(rng, 1.5, 4.0) * rng.standard_normal(rgb.shape, dtype=_F32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_gland_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    scale: float | None = None,
    malignant: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic H&E gland image.

    Returns the RGB ``uint8`` image (height x width x 3) and the ``int32`` instance label map
    (0 = background, 1..N glands, every gland at least ``MIN_GLAND_AREA`` px). ``scale`` is the
    size of a GlaS pixel in output pixels (default: short side / 522, a downscaled GlaS field);
    ``malignant`` picks the grade's morphology (default: drawn, 55 % malignant as in GlaS).
    """
    if height < 16 or width < 16:
        raise ValueError(f"images must be at least 16 x 16 px, got {height} x {width}")
    if scale is None:
        scale = min(height, width) / _GLAS_SHORT_SIDE
    if malignant is None:
        malignant = bool(rng.random() < 0.55)
    xx, yy = _grid(height, width)
    warp = max(1.0, scale * _u(rng, 4.0, 10.0))
    wavelength = max(8.0, 70.0 * scale)
    xw = xx + warp * _smooth(rng, height, width, wavelength)
    yw = yy + warp * _smooth(rng, height, width, wavelength)
    fine = max(0.4, 1.2 * scale)  # slightly ragged outlines
    xw += fine * _smooth(rng, height, width, max(3.0, 12.0 * scale))
    yw += fine * _smooth(rng, height, width, max(3.0, 12.0 * scale))
    tissue = np.ones((height, width), bool)
    if rng.random() < 0.15:  # edge of the section: white glass along one side
        side = _smooth(rng, height, width, max(height, width) / 2.0)
        ramp = [xx / width, 1 - xx / width, yy / height, 1 - yy / height][int(rng.integers(4))]
        tissue = ramp + 0.1 * side > _u(rng, 0.12, 0.3)
    glands = _place_glands(rng, height, width, scale, malignant)
    min_area = max(MIN_GLAND_AREA, int(60 * scale * scale))
    lay = _layout(glands, xw, yw, tissue, min_area)
    h, e = _paint_stroma(rng, height, width, scale, xw, yw)
    _paint_vessels(rng, lay.labels, scale, h, e)
    _paint_glands(rng, lay, glands, scale, h, e, height, width)
    glass = ~tissue
    h[glass] = 0.01
    e[glass] = 0.015
    grey = np.zeros((height, width), _F32)
    image = _stain_rgb(rng, h, e, grey)
    return image, lay.labels


# --------------------------------------------------------------------------------------------------
# Writing the raw release layouts
# --------------------------------------------------------------------------------------------------


def _render_item(
    seed: int, split_id: int, index: int, height: int, width: int, scale: float
) -> tuple[Array, Array, bool]:
    rng = np.random.default_rng([seed, split_id, index])
    malignant = bool(rng.random() < 0.55)
    image, labels = render_gland_image(rng, height, width, scale=scale, malignant=malignant)
    return image, labels, malignant


def _grade(seed: int, split_id: int, index: int, malignant: bool) -> tuple[str, str]:
    """The GlaS grade and the finer Sirinukunwattana et al. grade of a rendered image."""
    rng = np.random.default_rng([seed, split_id, index, 1])
    if malignant:
        return "malignant", _MALIGNANT_GRADES[int(rng.integers(len(_MALIGNANT_GRADES)))]
    return "benign", _BENIGN_GRADES[int(rng.integers(len(_BENIGN_GRADES)))]


def _write_glas_range(
    out: str, split: str, start: int, stop: int, height: int, width: int, seed: int
) -> list[tuple[str, bool]]:
    """Render and save GlaS images ``start..stop-1`` (1-based) of a split; module level so worker
    processes can run it."""
    scale = min(height, width) / _GLAS_SHORT_SIDE
    done = []
    for index in range(start, stop):
        image, labels, malignant = _render_item(
            seed, GLAS_SPLITS[split], index, height, width, scale
        )
        if labels.max() > 255:
            raise DatasetError(
                f"{labels.max()} glands do not fit an 8-bit annotation: use a smaller size"
            )
        name = f"{split}_{index}"
        Image.fromarray(image).save(os.path.join(out, f"{name}.bmp"), format="BMP")
        Image.fromarray(labels.astype(np.uint8)).save(
            os.path.join(out, f"{name}_anno.bmp"), format="BMP"
        )
        done.append((name, malignant))
    return done


def _write_crag_range(
    out: str, split: str, start: int, stop: int, height: int, width: int, seed: int
) -> list[tuple[str, bool]]:
    short = min(height, width)
    scale = max(short / _CRAG_SHORT_SIDE, min(_CRAG_MIN_SCALE, short / _GLAS_SHORT_SIDE))
    stem = "train" if split == "train" else "test"
    done = []
    for index in range(start, stop):
        image, labels, malignant = _render_item(
            seed, CRAG_SPLITS[split], index, height, width, scale
        )
        dtype = np.uint8 if labels.max() <= 255 else np.uint16
        name = f"{stem}_{index}.png"
        Image.fromarray(image).save(os.path.join(out, split, "Images", name), format="PNG")
        Image.fromarray(labels.astype(dtype)).save(
            os.path.join(out, split, "Annotation", name), format="PNG"
        )
        done.append((name, malignant))
    return done


def _run_jobs(fn, out: Path, jobs: list[tuple[str, int]], height, width, seed, workers):
    """Run ``fn`` over (split, count) jobs, in chunks across processes for big sets; the files
    written never depend on ``workers``."""
    total = sum(c for _, c in jobs) * height * width
    if workers is None:
        workers = _available_cpus() if total >= _PARALLEL_MIN_PIXELS else 1
    chunks = []
    for split, count in jobs:
        step = max(1, count // (4 * max(1, workers)))
        chunks += [(split, a, min(a + step, count + 1)) for a in range(1, count + 1, step)]
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        return [r for s, a, b in chunks for r in fn(str(out), s, a, b, height, width, seed)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, str(out), s, a, b, height, width, seed) for s, a, b in chunks]
        return [r for f in futures for r in f.result()]


def _write_atomically(root: Path, wanted: dict, fill) -> Path:
    """Build in a hidden sibling folder, write the marker last, rename into place: an interrupted
    run never leaves something that looks finished, and a complete set is reused."""
    root = Path(root)
    if root.exists():
        if read_marker(root) == wanted:
            return root
        refuse_existing(root, wanted)
    return publish(root, wanted, fill, lambda: read_marker(root) == wanted)


def _check_size(height: int, width: int) -> None:
    if height < 16 or width < 16:
        raise DatasetError(f"images must be at least 16 x 16 px, got {height} x {width}")


def write_glas_raw(
    root: Path,
    num_train: int = 85,
    num_test_a: int = 60,
    num_test_b: int = 20,
    height: int = 522,
    width: int = 775,
    seed: int = 0,
    *,
    workers: int | None = None,
) -> Path:
    """Write a synthetic GlaS release flat under ``root`` and return ``root``.

    Files: ``{train,testA,testB}_{i}.bmp`` (RGB, i from 1), ``..._anno.bmp`` (8-bit instance ids)
    and ``Grade.csv`` (one row per image; the grade matches the morphology drawn). Complete sets
    with the same parameters are reused; anything else at ``root`` raises ``DatasetError``.
    """
    counts = {"train": num_train, "testA": num_test_a, "testB": num_test_b}
    if num_train < 1 or min(counts.values()) < 0:
        raise DatasetError(f"need at least one training image and no negative counts, got {counts}")
    _check_size(height, width)
    wanted = {
        "dataset": "glas",
        "num_train": num_train,
        "num_test_a": num_test_a,
        "num_test_b": num_test_b,
        "height": height,
        "width": width,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }

    def fill(tmp: Path) -> None:
        jobs = [(s, c) for s, c in counts.items() if c > 0]
        done = _run_jobs(_write_glas_range, tmp, jobs, height, width, seed, workers)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(GLAS_GRADE_HEADER)
        patient_offset = 0
        by_name = dict(done)
        for split, count in counts.items():
            for index in range(1, count + 1):
                name = f"{split}_{index}"
                split_id = GLAS_SPLITS[split]
                grade, fine = _grade(seed, split_id, index, by_name[name])
                patient = patient_offset + (index - 1) // 5 + 1  # about five images per patient
                writer.writerow([name, patient, grade, fine])
            patient_offset += (count + 4) // 5
        (tmp / "Grade.csv").write_text(buf.getvalue())

    return _write_atomically(Path(root), wanted, fill)


def write_crag_raw(
    root: Path,
    num_train: int = 173,
    num_valid: int = 40,
    height: int = 1512,
    width: int = 1516,
    seed: int = 0,
    *,
    workers: int | None = None,
) -> Path:
    """Write a synthetic CRAG release under ``root`` and return ``root``: ``train/Images/
    train_{i}.png`` + ``train/Annotation/train_{i}.png`` and ``valid/Images/test_{i}.png`` +
    ``valid/Annotation/test_{i}.png`` (8-bit instance ids, 16-bit if an image has > 255 glands).
    Reuse and refusal as in ``write_glas_raw``."""
    if num_train < 1 or num_valid < 0:
        raise DatasetError(f"need num_train >= 1 and num_valid >= 0, got {num_train}, {num_valid}")
    _check_size(height, width)
    wanted = {
        "dataset": "crag",
        "num_train": num_train,
        "num_valid": num_valid,
        "height": height,
        "width": width,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }

    def fill(tmp: Path) -> None:
        for split in CRAG_SPLITS:
            (tmp / split / "Images").mkdir(parents=True)
            (tmp / split / "Annotation").mkdir()
        jobs = [(s, c) for s, c in (("train", num_train), ("valid", num_valid)) if c > 0]
        _run_jobs(_write_crag_range, tmp, jobs, height, width, seed, workers)

    return _write_atomically(Path(root), wanted, fill)
