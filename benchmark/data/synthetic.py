"""Deterministic synthetic H&E colorectal tissue patches in the NCT-CRC-HE-100K layout.

Why it exists: tests, CI and the demo must pre-train end to end without downloading
NCT-CRC-HE-100K, and ConCL learns *concept* (region-level) features, so a useful stand-in must put
several tissue types into one patch, as real patches at tissue boundaries do. Each patch is split
into 2-4 regions by a warped Voronoi partition, every region is painted with its own tissue recipe,
and the patch is filed under its dominant type, so the folder layout and list file look like NCT's.

Recipes paint haematoxylin (H) and eosin (E) concentrations; a per-patch stain matrix turns them
into RGB through Beer-Lambert optical density. That yields H&E colours (blue-purple nuclei, pink
cytoplasm and stroma, white lumen and fat) and NONORM-like stain variation between patches.

Everything is a function of a ``numpy.random.Generator`` seeded per patch with
``default_rng([seed, index])``, so a patch is bit-identical whatever else is generated, and in
whatever order. Recipes work on 1-D arrays of pixel coordinates, so only a region's own pixels are
computed: about 15-20 ms per 224 px patch on one core.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from benchmark.data.markers import MARKER_NAME, publish, read_marker, refuse_existing
from benchmark.data.pretrain import DatasetError

__all__ = [
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "TISSUE_TYPES",
    "dominant_type",
    "is_complete",
    "render_patch",
    "write_pretrain_set",
]

TISSUE_TYPES: tuple[str, ...] = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
GENERATOR_VERSION = 1  # bump whenever the pixels a seed produces change
# Recipes draw at NCT's 0.5 um/px on a 224 px patch; other sizes show the same field of view.
REFERENCE_SIZE = 224

_F32 = np.float32
# Macenko's reference H&E optical-density vectors (RGB, unit length).
_H_REF = np.array([0.5626, 0.7201, 0.4062])
_E_REF = np.array([0.2159, 0.8012, 0.5581])
# Number of regions per patch: 1, 2, 3 or 4 (most patches mix tissue types).
_REGION_PROBS = (0.12, 0.40, 0.33, 0.15)
_PARALLEL_MIN_IMAGES = 128

Array = np.ndarray
Recipe = Callable[[np.random.Generator, "_Region"], "tuple[Array, Array, Array | float]"]


# --------------------------------------------------------------------------------------------------
# Noise primitives
# --------------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


@lru_cache(maxsize=64)
def _bspline_taps(size: int, cells: int) -> tuple[Array, Array, Array]:
    """Cubic B-spline taps that upsample ``cells + 3`` knots to ``size`` px: knot indices and
    weights (size x 4), and 1 / the per-pixel weight norm, which gives every pixel unit variance."""
    t = (np.arange(size) + 0.5) / size * cells
    i = np.floor(t).astype(np.intp)
    f = t - i
    w = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3])
    w = w.T / 6.0
    inv_norm = 1.0 / np.sqrt((w**2).sum(axis=1))
    out = (i[:, None] + np.arange(4), w.astype(_F32), np.outer(inv_norm, inv_norm).astype(_F32))
    for a in out:
        a.setflags(write=False)  # cached and shared between calls
    return out


def _grid_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Smooth unit-variance noise on the full ``size`` x ``size`` grid, upsampled separably from a
    small lattice: far cheaper than per-pixel noise, and no BLAS, whose threads would oversubscribe
    the worker processes."""
    lattice = rng.standard_normal((cells + 3, cells + 3), dtype=_F32)
    taps, w, inv_norm = _bspline_taps(size, cells)
    rows = w[:, 0, None] * lattice[taps[:, 0]]  # (size, cells + 3): smooth along y
    for k in range(1, 4):
        rows += w[:, k, None] * lattice[taps[:, k]]
    rows = np.ascontiguousarray(rows.T)  # gathering whole rows is faster than columns
    out = rows[taps[:, 0]] * w[:, 0, None]  # (x, y)
    for k in range(1, 4):
        out += rows[taps[:, k]] * w[:, k, None]
    out = out.T * inv_norm
    return out


def _noise_at(rng: np.random.Generator, u: Array, v: Array) -> Array:
    """Unit-variance value noise at arbitrary lattice coordinates, for warped or rotated frames
    that a grid cannot express."""
    if u.size == 0:
        return np.zeros_like(u)
    fu0 = np.floor(u)
    fv0 = np.floor(v)
    iu = fu0.astype(np.intp)
    iv = fv0.astype(np.intp)
    iu -= iu.min()
    iv -= iv.min()
    nv = int(iv.max()) + 2
    lattice = rng.standard_normal((int(iu.max()) + 2) * nv, dtype=_F32)
    k = iu * nv + iv
    su = u - fu0
    sv = v - fv0
    su = su * su * su * (su * (su * 6 - 15) + 10)  # quintic fade: no visible lattice creases
    sv = sv * sv * sv * (sv * (sv * 6 - 15) + 10)
    a = lattice[k]
    c = lattice[k + 1]
    ab = a + (lattice[k + nv] - a) * su
    cd = c + (lattice[k + nv + 1] - c) * su
    val = ab + (cd - ab) * sv
    val /= np.sqrt(((1 - su) ** 2 + su * su) * ((1 - sv) ** 2 + sv * sv))
    return val


def _rotate(x: Array, y: Array, angle: float) -> tuple[Array, Array]:
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return x * c + y * s, y * c - x * s


def _soft(dist: Array, radius: float, px: float) -> Array:
    """Anti-aliased inside-mask of a normalised distance (1 = boundary), one output px wide."""
    return np.clip((1.0 - dist) * (radius / px) + 0.5, 0.0, 1.0)


class _Nearest(NamedTuple):
    dist: Array  # normalised elliptical distance to the nearest point (< 1: inside its ellipse)
    index: Array  # table index of that point, to look up per-point attributes
    count: int  # table size, for drawing per-point attributes
    a: Array | None  # coordinates in the winner's frame, normalised by its half-axes
    b: Array | None


def _nearest(
    rng: np.random.Generator,
    u: Array,
    v: Array,
    cell: tuple[float, float],
    radius: tuple[float, float],
    *,
    presence: float = 1.0,
    jitter: float = 0.9,
    angle_jitter: float = np.pi,
    radius_jitter: float = 0.15,
    local: bool = False,
) -> _Nearest:
    """Jittered-grid ellipses (Worley-style): one candidate ellipse per cell.

    Vectorised over pixels, so nuclei, glands and fat cells cost a few gathers per pixel instead of
    a Python loop over objects. Small ellipses search the 2x2 nearest cells, large ones 3x3.
    """
    cu, cv = cell
    fu = u / cu
    fv = v / cv
    gu = np.floor(fu).astype(np.intp)
    gv = np.floor(fv).astype(np.intp)
    gu0 = int(gu.min()) - 1
    gv0 = int(gv.min()) - 1
    nu = int(gu.max()) - gu0 + 2
    nv = int(gv.max()) - gv0 + 2
    n = nu * nv
    ii, jj = np.divmod(np.arange(n), nv)
    pu = (ii + gu0 + 0.5 + jitter * (rng.random(n) - 0.5)) * cu
    pv = (jj + gv0 + 0.5 + jitter * (rng.random(n) - 0.5)) * cv
    if angle_jitter >= np.pi:
        theta = rng.uniform(-np.pi, np.pi, n)
    else:
        theta = rng.normal(0.0, angle_jitter, n)
    scale = 1.0 + radius_jitter * np.clip(rng.standard_normal(n), -2, 2)
    pu[rng.random(n) >= presence] = 1e6  # absent points are simply far away
    isotropic = radius[0] == radius[1] and not local
    if isotropic:
        table = np.stack([pu, pv, 1 / (radius[0] * scale)]).astype(_F32)
    else:
        table = np.stack(
            [pu, pv, np.cos(theta), np.sin(theta), 1 / (radius[0] * scale), 1 / (radius[1] * scale)]
        ).astype(_F32)
    # A point stays within jitter/2 cells of its cell centre, so an ellipse that is shorter than
    # (1 - jitter/2) cells can only reach pixels in the 2x2 cells nearest to them.
    reach = max(radius) * (1 + 2 * radius_jitter)
    if reach < (1 - jitter / 2) * min(cu, cv):
        base = (gu - gu0 - (fu - gu < 0.5)) * nv + (gv - gv0 - (fv - gv < 0.5))
        offsets = [0, 1, nv, nv + 1]
    else:
        base = (gu - gu0) * nv + (gv - gv0)
        offsets = [du * nv + dv for du in (-1, 0, 1) for dv in (-1, 0, 1)]
    best = np.full(u.shape, np.inf, _F32)
    index = np.zeros(u.shape, np.intp)
    best_a = np.zeros(u.shape, _F32) if local else None
    best_b = np.zeros(u.shape, _F32) if local else None
    for off in offsets:
        k = base + off
        if isotropic:
            px_, py_, ir = np.take(table, k, axis=1)
            x = u - px_
            y = v - py_
            d = (x * x + y * y) * (ir * ir)
        else:
            px_, py_, c, s, ia, ib = np.take(table, k, axis=1)
            x = u - px_
            y = v - py_
            a = (x * c + y * s) * ia
            b = (y * c - x * s) * ib
            d = a * a + b * b
        closer = d < best
        np.minimum(best, d, out=best)
        np.copyto(index, k, where=closer)
        if local:
            np.copyto(best_a, a, where=closer)
            np.copyto(best_b, b, where=closer)
    return _Nearest(np.sqrt(best), index, n, best_a, best_b)


def _cell_walls(rng: np.random.Generator, u: Array, v: Array, cell: float) -> Array:
    """Approximate distance (px) to the nearest Voronoi wall, (F2 - F1) / 2: adipocyte membranes."""
    gu = np.floor(u / cell).astype(np.intp)
    gv = np.floor(v / cell).astype(np.intp)
    gu0 = int(gu.min()) - 1
    gv0 = int(gv.min()) - 1
    nv = int(gv.max()) - gv0 + 2
    n = (int(gu.max()) - gu0 + 2) * nv
    ii, jj = np.divmod(np.arange(n), nv)
    pu = ((ii + gu0 + 0.5 + 0.8 * (rng.random(n) - 0.5)) * cell).astype(_F32)
    pv = ((jj + gv0 + 0.5 + 0.8 * (rng.random(n) - 0.5)) * cell).astype(_F32)
    base = (gu - gu0) * nv + (gv - gv0)
    f1 = np.full(u.shape, np.inf, _F32)
    f2 = np.full(u.shape, np.inf, _F32)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            k = base + (du * nv + dv)
            x = u - pu[k]
            y = v - pv[k]
            d = x * x + y * y
            f2 = np.where(d < f1, f1, np.minimum(f2, d))
            np.minimum(f1, d, out=f1)
    return (np.sqrt(f2) - np.sqrt(f1)) * 0.5


class _Region:
    """The pixels one recipe paints, in reference-pixel coordinates (224 px = 112 um at NCT's
    0.5 um/px, whatever the output size), with cheap full-grid noise looked up at those pixels."""

    def __init__(self, sel: Array, size: int) -> None:
        self.sel = sel
        self.size = size
        self.px = REFERENCE_SIZE / size  # reference pixels per output pixel
        xx, yy = _pixel_grid(size)
        self.x = xx.ravel()[sel] * self.px
        self.y = yy.ravel()[sel] * self.px

    def noise(self, rng: np.random.Generator, scale: float) -> Array:
        """Unit-variance noise with wavelength ``scale`` reference px."""
        cells = int(min(self.size, max(1, round(REFERENCE_SIZE / scale))))
        return _grid_noise(rng, self.size, cells).ravel()[self.sel]

    def fbm(self, rng: np.random.Generator, scale: float, octaves: int = 3) -> Array:
        """Fractal noise: octaves of halving wavelength and amplitude, about unit variance."""
        total = self.noise(rng, scale)
        weight = 1.0
        for o in range(1, octaves):
            total += 0.5**o * self.noise(rng, scale / 2**o)
            weight += 0.25**o
        total /= np.sqrt(weight)
        return total

    def warped(self, rng: np.random.Generator, scale: float, amp: float) -> tuple[Array, Array]:
        """Domain-warped coordinates, so shapes are organic rather than geometric."""
        return (
            self.x + amp * self.fbm(rng, scale, 2),
            self.y + amp * self.fbm(rng, scale, 2),
        )

    def fibres(
        self, rng: np.random.Generator, angle: float, wave: float, length: float
    ) -> tuple[Array, Array, Array]:
        """Fibre texture along ``angle``: noise stretched ``length``:3 in a warped, rotated frame.
        Returns the texture and the frame (u along the fibres) so nuclei can follow it."""
        xw, yw = self.warped(rng, 70.0, wave)
        u, v = _rotate(xw, yw, angle)
        tex = 0.65 * _noise_at(rng, u / length, v / 3.0) + 0.35 * _noise_at(rng, u / 12.0, v / 1.6)
        return tex, u, v


def _spindle_nuclei(
    rng: np.random.Generator, u: Array, v: Array, px: float, *, cell_u: float, presence: float
) -> Array:
    """Elongated nuclei aligned with a fibre frame (u along the fibres)."""
    half_len = _u(rng, 7.0, 11.0)
    nuc = _nearest(rng, u, v, (cell_u, 14.0), (half_len, 2.0), presence=presence, angle_jitter=0.12)
    return _soft(nuc.dist, 2.0, px) * rng.uniform(0.8, 1.15, nuc.count).astype(_F32)[nuc.index]


# --------------------------------------------------------------------------------------------------
# Tissue recipes: (rng, region) -> (H, E, neutral grey) optical densities at the region's pixels.
# Typical values: nuclei H 1.5-2.2, muscle E 0.6-0.95, stroma E 0.25-0.5, lumen and fat < 0.05.
# --------------------------------------------------------------------------------------------------


def _adipose(rng: np.random.Generator, r: _Region):
    xw, yw = r.warped(rng, 80.0, 7.0)
    wall = _cell_walls(rng, xw, yw, _u(rng, 45.0, 70.0))
    thick = _u(rng, 0.7, 1.3) * np.clip(1 + 0.4 * r.noise(rng, 12.0), 0.3, None)
    membrane = np.clip((thick - wall) / r.px + 0.5, 0.0, 1.0)
    membrane *= r.fbm(rng, 40.0, 2) > -1.4  # a few torn walls, as in cut sections
    e = 0.03 + membrane * _u(rng, 0.45, 0.8) * (0.85 + 0.15 * r.noise(rng, 5.0))
    nuc = _nearest(rng, xw, yw, (40.0, 40.0), (6.0, 1.8), presence=0.3)
    flat = _soft(nuc.dist, 1.8, r.px) * (wall < 3.0)
    h = 0.02 + flat * _u(rng, 1.2, 1.7) + 0.03 * membrane
    return h, e, 0.0


def _background(rng: np.random.Generator, r: _Region):
    grey = _u(rng, 0.0, 0.18) + 0.015 * r.fbm(rng, 60.0, 2)
    tint = r.fbm(rng, 90.0, 2)
    e = _u(rng, 0.0, 0.05) * (1 + 0.5 * tint)
    h = _u(rng, 0.0, 0.03) * (1 - 0.5 * tint)
    dust = _nearest(rng, r.x, r.y, (30.0, 30.0), (1.5, 1.5), presence=_u(rng, 0.0, 0.08))
    grey = grey + 0.6 * _soft(dust.dist, 1.2, r.px)
    return np.clip(h, 0, None), np.clip(e, 0, None), np.clip(grey, 0, None)


def _debris(rng: np.random.Generator, r: _Region):
    frag = np.clip((r.fbm(rng, 22.0) - _u(rng, -0.5, 0.1)) * 1.6, 0.0, 1.0)
    e = 0.08 + frag * _u(rng, 0.5, 0.9) * (0.8 + 0.2 * r.noise(rng, 3.0))
    h = 0.08 + 0.3 * np.clip(r.fbm(rng, 35.0, 2), 0.0, None)
    specks = _nearest(rng, r.x, r.y, (9.0, 9.0), (1.6, 1.6), presence=0.4, radius_jitter=0.35)
    bodies = _nearest(rng, r.x, r.y, (20.0, 20.0), (3.4, 3.4), presence=0.35, radius_jitter=0.3)
    ragged = bodies.dist * (1 + 0.3 * r.noise(rng, 1.5))
    h = h + 1.9 * _soft(specks.dist, 1.6, r.px) + 1.3 * _soft(ragged, 3.3, r.px)
    return h, e, 0.0


def _lymphocytes(rng: np.random.Generator, r: _Region):
    cell = _u(rng, 10.0, 12.0)
    rad = cell * _u(rng, 0.38, 0.44)
    nuc = _nearest(rng, r.x, r.y, (cell, cell), (rad, rad), presence=0.93, radius_jitter=0.1)
    shade = rng.uniform(0.8, 1.15, nuc.count).astype(_F32)[nuc.index]
    chromatin = 0.85 + 0.15 * r.noise(rng, 1.8)
    h = 0.18 + 0.08 * r.fbm(rng, 40.0, 2)
    h = h + _soft(nuc.dist, rad, r.px) * shade * chromatin * _u(rng, 1.6, 2.2)
    e = 0.2 + 0.07 * r.fbm(rng, 30.0, 2)
    return h, e, 0.0


def _mucus(rng: np.random.Generator, r: _Region):
    xw, yw = r.warped(rng, 60.0, 20.0)
    u, v = _rotate(xw, yw, _u(rng, 0.0, np.pi))
    strands = _noise_at(rng, u / 35.0, v / 4.0)  # flowing, streaky mucin
    wisps = np.clip(1.0 - np.abs(_noise_at(rng, xw / 45.0, yw / 45.0)), 0.0, 1.0) ** 3
    density = np.clip(0.6 + 0.25 * r.fbm(rng, 50.0, 2) + 0.2 * strands, 0.05, None)
    density *= _u(rng, 0.7, 1.4)
    h = 0.16 * density + 0.12 * wisps
    e = 0.08 * density + 0.07 * wisps
    cells = _nearest(rng, r.x, r.y, (40.0, 40.0), (3.8, 3.8), presence=0.08)
    h = h + 1.4 * _soft(cells.dist, 3.5, r.px)
    return h, e, 0.0


def _muscle(rng: np.random.Generator, r: _Region):
    tex, u, v = r.fibres(rng, _u(rng, 0.0, np.pi), wave=_u(rng, 2.0, 6.0), length=45.0)
    e = _u(rng, 0.6, 0.95) * (0.85 + 0.12 * tex)
    clefts = _noise_at(rng, u / 70.0, v / 7.0) > _u(rng, 1.2, 1.8)  # gaps between bundles
    e = np.where(clefts, e * 0.25, e)
    nuclei = _spindle_nuclei(rng, u, v, r.px, cell_u=_u(rng, 32.0, 45.0), presence=0.55)
    h = 0.07 + 0.03 * tex + nuclei * _u(rng, 1.4, 1.9) * ~clefts
    return h, e, 0.0


def _stroma(rng: np.random.Generator, r: _Region):
    tex, u, v = r.fibres(rng, _u(rng, 0.0, np.pi), wave=_u(rng, 8.0, 16.0), length=30.0)
    gaps = np.clip((_noise_at(rng, u / 40.0, v / 5.0) + 1.1) * 1.5, 0.0, 1.0)
    e = 0.04 + _u(rng, 0.25, 0.5) * np.clip(0.6 + 0.45 * tex, 0.0, None) * gaps
    nuclei = _spindle_nuclei(rng, u, v, r.px, cell_u=_u(rng, 40.0, 60.0), presence=0.3)
    h = 0.04 + nuclei * _u(rng, 1.3, 1.8)
    return h, e, 0.0


def _gland_field(
    rng: np.random.Generator,
    r: _Region,
    *,
    cell: float,
    radius: float,
    aspect: float,
    warp: float,
    presence: float,
) -> tuple[_Nearest, Array, Array]:
    """Nearest gland per pixel: normalised radius rho (1 = basement membrane) and polar angle."""
    xw, yw = r.warped(rng, 60.0, warp)
    g = _nearest(
        rng,
        xw,
        yw,
        (cell, cell),
        (radius, radius / aspect),
        presence=presence,
        jitter=0.8,
        radius_jitter=0.15,
        local=True,
    )
    assert g.a is not None and g.b is not None
    return g, g.dist, np.arctan2(g.b, g.a)


def _ring_nuclei(
    rng: np.random.Generator,
    g: _Nearest,
    rho: Array,
    theta: Array,
    px: float,
    *,
    radius: float,
    centre: float,
    spacing: float,
    half: tuple[float, float],
    keep: float,
) -> Array:
    """One row of ellipses around each gland at normalised radius ``centre``, ``spacing`` px
    apart, with ``half`` = (tangential, radial) half-axes in px: the epithelial lining."""
    count = max(6, round(2 * np.pi * radius * centre / spacing))
    per_gland = rng.integers(count - 3, count + 4, g.count)[g.index]
    phase = (theta / (2 * np.pi) + 0.5) * per_gland + rng.random(g.count).astype(_F32)[g.index]
    j = np.floor(phase)
    slot = (j.astype(np.intp) % per_gland) % 64  # per-nucleus attributes, continuous across +-pi
    jit = rng.random((g.count, 64)).astype(_F32)[g.index, slot]
    there = rng.random((g.count, 64))[g.index, slot] < keep
    across = (phase - j - 0.5) * (2 * np.pi * radius * centre / per_gland)
    radial = (rho - (centre + 0.08 * (jit - 0.5))) * radius
    d = np.sqrt((across / half[0]) ** 2 + (radial / half[1]) ** 2)
    return _soft(d, half[0], px) * there * (0.85 + 0.3 * jit)


def _gland_compartments(rho: Array, radius: float, lumen_r: float, px: float):
    """Soft masks of a gland (inside), its epithelial ring (epi) and its lumen."""
    inside = np.clip((1.0 - rho) * radius / px + 0.5, 0.0, 1.0)
    epi = np.clip((rho - lumen_r) * radius / px + 0.5, 0.0, 1.0) * inside
    return inside, epi, inside - epi


def _normal_mucosa(rng: np.random.Generator, r: _Region):
    radius = _u(rng, 30.0, 42.0)
    g, rho, theta = _gland_field(
        rng, r, cell=radius * _u(rng, 2.1, 2.5), radius=radius,
        aspect=_u(rng, 1.0, 1.8), warp=_u(rng, 3.0, 7.0), presence=0.9,
    )  # fmt: skip
    lumen_r = _u(rng, 0.3, 0.45)
    inside, epi, lumen = _gland_compartments(rho, radius, lumen_r, r.px)
    goblet = _ring_nuclei(
        rng, g, rho, theta, r.px, radius=radius, centre=(lumen_r + 0.72) / 2,
        spacing=11.0, half=(3.5, radius * 0.14), keep=0.8,
    )  # fmt: skip
    nuclei = _ring_nuclei(
        rng, g, rho, theta, r.px, radius=radius, centre=0.86, spacing=6.5,
        half=(2.2, 4.5), keep=0.92,
    )  # fmt: skip
    lp = 1.0 - inside  # lamina propria between the crypts
    lp_cells = _nearest(rng, r.x, r.y, (12.0, 12.0), (3.2, 3.2), presence=0.45)
    lp_nuc = _soft(lp_cells.dist, 3.2, r.px) * lp
    cyto_e = _u(rng, 0.35, 0.6) * (1 - 0.75 * goblet)
    e = lp * (0.28 + 0.08 * r.fbm(rng, 25.0)) + epi * cyto_e + lumen * 0.04
    h = lp * 0.1 + epi * (0.07 + 0.1 * goblet) + lumen * 0.02
    h = h + _u(rng, 1.5, 2.0) * (nuclei * epi + lp_nuc)
    return h, e, 0.0


def _tumour(rng: np.random.Generator, r: _Region):
    radius = _u(rng, 38.0, 55.0)
    _, rho, _ = _gland_field(
        rng, r, cell=radius * _u(rng, 1.7, 2.1), radius=radius,
        aspect=_u(rng, 1.0, 2.0), warp=_u(rng, 10.0, 18.0), presence=0.95,
    )  # fmt: skip
    lumen_r = _u(rng, 0.08, 0.35)
    inside, epi, lumen = _gland_compartments(rho, radius, lumen_r, r.px)
    rad = _u(rng, 5.0, 6.5)
    nuc = _nearest(
        rng, r.x, r.y, (11.5, 11.5), (rad * 1.3, rad * 0.85), presence=0.96, jitter=1.0,
        radius_jitter=0.2,
    )  # fmt: skip
    ragged = nuc.dist * (1 + 0.1 * r.noise(rng, 6.0))  # irregular outlines
    pleo = rng.uniform(0.7, 1.25, nuc.count).astype(_F32)[nuc.index]
    vesicular = 0.85 + 0.15 * r.noise(rng, 2.0)
    nuclei = _soft(ragged, rad, r.px) * pleo * vesicular * epi
    necrosis = np.clip(r.fbm(rng, 10.0, 3), 0.0, None) * lumen  # "dirty" luminal debris
    stroma = 1.0 - inside
    tex, _, _ = r.fibres(rng, _u(rng, 0.0, np.pi), wave=10.0, length=25.0)
    e = stroma * (0.35 + 0.1 * tex) + epi * _u(rng, 0.35, 0.55) + lumen * 0.05 + 0.4 * necrosis
    h = stroma * 0.06 + epi * _u(rng, 0.15, 0.3) + lumen * 0.03 + 0.3 * necrosis
    h = h + nuclei * _u(rng, 1.5, 2.0)
    return h, e, 0.0


_RECIPES: dict[str, Recipe] = {
    "ADI": _adipose,
    "BACK": _background,
    "DEB": _debris,
    "LYM": _lymphocytes,
    "MUC": _mucus,
    "MUS": _muscle,
    "NORM": _normal_mucosa,
    "STR": _stroma,
    "TUM": _tumour,
}


# --------------------------------------------------------------------------------------------------
# Patch assembly
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(_F32)
    xx.setflags(write=False)  # cached and shared between calls
    yy.setflags(write=False)
    return xx, yy


def _partition(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """Warped, additively weighted Voronoi partition into 1-4 regions with distinct tissue types."""
    n = int(rng.choice(len(_REGION_PROBS), p=_REGION_PROBS)) + 1
    types = rng.choice(len(TISSUE_TYPES), size=n, replace=False)
    if n == 1:
        return np.zeros((size, size), np.intp), types
    xx, yy = _pixel_grid(size)
    amp = size * _u(rng, 0.12, 0.22)
    fine = size * 0.012
    wx = xx + amp * _grid_noise(rng, size, 3) + fine * _grid_noise(rng, size, 14)
    wy = yy + amp * _grid_noise(rng, size, 3) + fine * _grid_noise(rng, size, 14)
    seeds = (rng.uniform(0.08, 0.92, (n, 2)) * size).astype(_F32)
    bias = (rng.uniform(-0.12, 0.12, n) * size).astype(_F32)
    d = np.stack([np.hypot(wx - sx, wy - sy) - b for (sx, sy), b in zip(seeds, bias, strict=True)])
    return np.argmin(d, axis=0), types


def _blur(img: Array, sigma: float) -> Array:
    """Separable Gaussian blur (edge padded): the optics of the scanner."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(_F32)
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = k[0] * p[:h]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[i : i + h]
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    out = k[0] * p[:, :w]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[:, i : i + w]
    return out


def _unit(v: Array) -> Array:
    v = np.clip(v, 0.02, None)
    return v / np.linalg.norm(v)


def _stain_to_rgb(rng: np.random.Generator, h: Array, e: Array, grey: Array, size: int) -> Array:
    """Beer-Lambert: per-patch stain vectors and strengths (NONORM variation), section thickness,
    slightly tinted glass, scanner blur and sensor noise."""
    h_vec = _unit(_H_REF + rng.normal(0.0, 0.05, 3)).astype(_F32)
    e_vec = _unit(_E_REF + rng.normal(0.0, 0.05, 3)).astype(_F32)
    h_gain, e_gain = (float(g) for g in rng.uniform(0.75, 1.3, 2))
    thickness = 1.0 + 0.1 * _grid_noise(rng, size, 2)
    h = (h * (h_gain * thickness))[..., None]
    e = (e * (e_gain * thickness))[..., None]
    od = h * h_vec + e * e_vec + (grey * 0.9)[..., None]
    white = 255.0 * (1.0 - _u(rng, 0.01, 0.06) - rng.uniform(0.0, 0.025, 3)).astype(_F32)
    rgb = white * np.exp(-od)
    rgb = _blur(rgb, _u(rng, 0.45, 0.85))
    rgb += _u(rng, 1.0, 2.5) * rng.standard_normal(rgb.shape, dtype=_F32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_patch(rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic H&E patch.

    Returns the RGB ``uint8`` image (size x size x 3) and the ``int64`` label map (size x size) of
    indices into ``TISSUE_TYPES``, which tests and concept-level analyses can use as ground truth.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    regions, types = _partition(rng, size)
    flat = regions.ravel()
    h = np.zeros(size * size, _F32)
    e = np.zeros(size * size, _F32)
    grey = np.zeros(size * size, _F32)
    for region, t in enumerate(types):
        sel = np.flatnonzero(flat == region)
        if sel.size == 0:
            continue
        rh, re, rn = _RECIPES[TISSUE_TYPES[t]](rng, _Region(sel, size))
        h[sel] = rh * _u(rng, 0.85, 1.15)  # per-region stain uptake
        e[sel] = re * _u(rng, 0.85, 1.15)
        grey[sel] = rn
    image = _stain_to_rgb(
        rng, h.reshape(size, size), e.reshape(size, size), grey.reshape(size, size), size
    )
    return image, types.astype(np.int64)[regions]


def dominant_type(labels: np.ndarray) -> int:
    """Index of the tissue type covering most pixels (ties go to the lower index)."""
    return int(np.bincount(labels.ravel(), minlength=len(TISSUE_TYPES)).argmax())


# --------------------------------------------------------------------------------------------------
# Writing a set
# --------------------------------------------------------------------------------------------------


def _relative_path(index: int, cls: str) -> str:
    return f"{cls}/{cls}-SYN{index:08d}.tif"


def _write_range(out: str, start: int, stop: int, size: int, seed: int) -> list[str]:
    """Render and save patches ``start..stop-1``; module level so worker processes can run it."""
    rels = []
    for index in range(start, stop):
        image, labels = render_patch(np.random.default_rng([seed, index]), size)
        rel = _relative_path(index, TISSUE_TYPES[dominant_type(labels)])
        Image.fromarray(image).save(os.path.join(out, rel), format="TIFF")
        rels.append(rel)
    return rels


def _marker(num_images: int, size: int, seed: int, list_file: str) -> dict:
    return {
        "num_images": num_images,
        "size": size,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "list_file": list_file,
    }


def is_complete(root: Path, num_images: int, size: int, seed: int) -> bool:
    """True if ``root`` holds a finished set generated with these parameters by this generator."""
    marker = read_marker(Path(root))
    if marker is None:
        return False
    wanted = _marker(num_images, size, seed, "")
    del wanted["list_file"]
    if any(marker.get(k) != v for k, v in wanted.items()):
        return False
    list_file = marker.get("list_file")
    return isinstance(list_file, str) and (Path(root) / list_file).is_file()


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def write_pretrain_set(
    root: Path,
    num_images: int,
    size: int = 224,
    seed: int = 0,
    list_file: str = "train.txt",
    *,
    workers: int | None = None,
) -> Path:
    """Write ``num_images`` synthetic patches as ``root/<CLASS>/<CLASS>-SYN<index>.tif`` plus a
    sorted list file, and return ``root``.

    The set is built in a temporary sibling folder and renamed into place, with the ``.complete``
    marker written last, so an interrupted run never leaves something that looks finished. An
    existing complete set with the same parameters is kept as is; anything else already at ``root``
    raises ``DatasetError`` (a ``ValueError`` the CLI prints as one line) rather than being
    deleted. ``workers`` (default: one per available CPU for large sets) only changes speed,
    never the bytes written.
    """
    root = Path(root)
    if num_images < 1:
        raise DatasetError(f"num_images must be positive, got {num_images}: ask for 1 or more")
    if size < 8:
        raise DatasetError(f"size must be at least 8 px, got {size}")
    if Path(list_file).name != list_file or list_file.startswith("."):
        raise DatasetError(f"list_file must be a plain file name, got {list_file!r}")
    wanted = _marker(num_images, size, seed, list_file)
    if root.exists():
        if read_marker(root) == wanted and is_complete(root, num_images, size, seed):
            return root
        refuse_existing(root, wanted, f"its {wanted['list_file']} is missing")

    def fill(tmp: Path) -> None:
        nonlocal workers
        for cls in TISSUE_TYPES:
            (tmp / cls).mkdir()
        if workers is None:
            workers = _available_cpus() if num_images >= _PARALLEL_MIN_IMAGES else 1
        workers = max(1, min(workers, num_images))
        if workers == 1:
            rels = _write_range(str(tmp), 0, num_images, size, seed)
        else:
            chunks = np.array_split(np.arange(num_images), workers * 4)
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(_write_range, str(tmp), int(c[0]), int(c[-1]) + 1, size, seed)
                    for c in chunks
                    if c.size
                ]
                rels = [rel for f in futures for rel in f.result()]
        (tmp / list_file).write_text("".join(f"{rel}\n" for rel in sorted(rels)))

    return publish(root, wanted, fill, lambda: is_complete(root, num_images, size, seed))
