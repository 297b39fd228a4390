"""Embedded demo dataset: a small synthetic MVTec-AD-style dataset generated on the fly.

A new user with nothing downloaded can run the demo config and see the anomaly detector
work: :func:`ensure_demo_dataset` renders the images procedurally (numpy + scipy, no
download, no network) the first time it is called, caches them, and reuses them afterwards.

Classes (``DEMO_CLASSES``) and defect types (``DEMO_DEFECTS``):

============  =======  ====================================================
class         kind     defect types
============  =======  ====================================================
``fabric``    texture  ``hole``, ``stain``, ``thread``
``wood``      texture  ``scratch``, ``crack``, ``hole``
``hex_nut``   object   ``scratch``, ``missing``, ``rust``
``capsule``   object   ``crack``, ``missing``, ``contamination``
============  =======  ====================================================

Normal images vary: texture phase, thread/ring period, small rotations, grain warping and
fibre noise for the textures; small shifts and rotations of the objects; per image
brightness, colour tint, an illumination gradient and sensor noise for all classes.

Default counts per class (``image_size=256``, RGB PNG): 60 ``train/good``, 15 ``test/good``
and 10 test images per defect type (3 types), i.e. 105 images per class and 420 in all,
plus one ground-truth mask per defective image. Building the whole default dataset takes
roughly 15-25 s on two CPU cores.

Layout (the MVTec AD layout)::

    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...
    <root>/<class>/test/<defect>/000.png ...
    <root>/<class>/ground_truth/<defect>/000_mask.png   (uint8 0/255, same size as the image)
    <root>/README.txt
    <root>/.complete                                      (JSON marker, written last)

Every image is rendered from its own ``numpy`` generator seeded from ``(seed, class, split,
kind, index)``, so a build is byte-identical whatever order (or subset) the images are made
in. A defective image is the clean scene that the same generator would render, plus a defect
drawn from a second, independent generator; its mask is the set of pixels the defect changed
(defect coverage >= ``_MASK_THRESHOLD``), not a bounding box.

Builds are atomic: images go to a temporary sibling folder that is renamed into place once
the marker file is written, so an interrupted build never looks complete.

Bump ``DEMO_VERSION`` whenever the generated pixels change; it is part of the cache path.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

DEMO_VERSION = "v1"

_LOG = logging.getLogger(__name__)

_MARKER = ".complete"
_README = "README.txt"
_MASK_THRESHOLD = 0.2  # a pixel is in the mask when the defect's coverage reaches this

DEFAULT_NUM_TRAIN = 60
DEFAULT_NUM_TEST_GOOD = 15
DEFAULT_NUM_TEST_DEFECT = 10
DEFAULT_IMAGE_SIZE = 256

# Light comes from the upper left (image x right, y down, z towards the camera).
_LIGHT = np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])
_HALF = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + np.array([0.0, 0.0, 1.0]))
_LIGHT_ANGLE = float(np.arctan2(_LIGHT[1], _LIGHT[0]))


# --------------------------------------------------------------------------------------
# Small rendering helpers (all vectorised).
# --------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c, indexing="ij")


def _upsample_cubic(small: np.ndarray, size: int, factor: float, offset: float) -> np.ndarray:
    """Catmull-Rom upsampling of a small grid onto ``size x size`` pixels (separable)."""
    t = np.arange(size, dtype=np.float64) / factor + offset
    i = np.floor(t).astype(np.int64)
    u = t - i
    w = [
        ((-u + 2.0) * u - 1.0) * u / 2.0,
        ((3.0 * u - 5.0) * u * u + 2.0) / 2.0,
        ((-3.0 * u + 4.0) * u + 1.0) * u / 2.0,
        (u - 1.0) * u * u / 2.0,
    ]
    rows = sum(w[k][:, None] * small[i - 1 + k, :] for k in range(4))
    return sum(w[k][None, :] * rows[:, i - 1 + k] for k in range(4))


def _noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth zero-mean unit-variance noise with correlation length about ``scale`` px."""
    if scale <= 3.0:
        n = ndimage.gaussian_filter(rng.standard_normal((size, size)), scale, mode="wrap")
    else:
        f = scale / 2.0
        m = int(np.ceil(size / f)) + 6
        small = ndimage.gaussian_filter(rng.standard_normal((m, m)), 1.5, mode="wrap")
        n = _upsample_cubic(small, size, f, 3.0)
    n = n - n.mean()
    return n / (n.std() + 1e-12)


def _aniso_noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    n = n - n.mean()
    return n / (n.std() + 1e-12)


def _aa(sd: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of the region ``sd < 0`` (``sd`` a signed distance in px)."""
    return np.clip(0.5 - sd / width, 0.0, 1.0)


def _sdf(inside: np.ndarray) -> np.ndarray:
    """Approximate signed distance (px) to the boundary of a boolean region."""
    if not inside.any():
        return np.full(inside.shape, np.inf)
    if inside.all():
        return np.full(inside.shape, -np.inf)
    out = ndimage.distance_transform_edt(~inside)
    inn = ndimage.distance_transform_edt(inside)
    return np.where(inside, -(inn - 0.5), out - 0.5)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _stadium_sd(a: np.ndarray, b: np.ndarray, a0: float, a1: float, r: float) -> np.ndarray:
    """Signed distance to a capsule whose axis runs along ``a`` from ``a0`` to ``a1``."""
    return np.hypot(a - np.clip(a, a0, a1), b) - r


def _hexagon_sd(px: np.ndarray, py: np.ndarray, apothem: float, corner: float) -> np.ndarray:
    """Signed distance to a rounded regular hexagon (flat sides top and bottom)."""
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    r = apothem - corner
    px, py = np.abs(px), np.abs(py)
    d = 2.0 * np.minimum(kx * px + ky * py, 0.0)
    px, py = px - d * kx, py - d * ky
    px = px - np.clip(px, -kz * r, kz * r)
    py = py - r
    return np.hypot(px, py) * np.sign(py) - corner


def _shade(nx: np.ndarray, ny: np.ndarray, nz: np.ndarray, shininess: float = 40.0):
    diffuse = np.clip(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0.0, 1.0)
    spec = np.clip(nx * _HALF[0] + ny * _HALF[1] + nz * _HALF[2], 0.0, 1.0) ** shininess
    return diffuse, spec


def _curve(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    step: float,
    bend: float,
    smooth: float,
    zigzag: float = 0.0,
) -> np.ndarray:
    """A random smooth (or jagged) polyline as an ``(n, 2)`` array of ``(y, x)`` points."""
    n = max(int(length / step), 3)
    turn = rng.normal(0.0, bend, n)
    if smooth > 0:
        turn = ndimage.gaussian_filter1d(turn, smooth, mode="nearest")
    h = heading + np.cumsum(turn) + rng.normal(0.0, zigzag, n) * (zigzag > 0)
    steps = step * np.stack([np.sin(h), np.cos(h)], axis=1)
    return np.concatenate([start[None], start[None] + np.cumsum(steps, axis=0)], axis=0)


def _polyline_distance(pts: np.ndarray, size: int, margin: float):
    """Distance from every pixel to a polyline, and the arc-length fraction of the nearest
    point. Pixels farther than ``margin`` from the polyline's bounding box get ``inf``."""
    dist = np.full((size, size), np.inf)
    frac = np.zeros((size, size))
    y0 = int(max(np.floor(pts[:, 0].min() - margin), 0))
    y1 = int(min(np.ceil(pts[:, 0].max() + margin), size))
    x0 = int(max(np.floor(pts[:, 1].min() - margin), 0))
    x1 = int(min(np.ceil(pts[:, 1].max() + margin), size))
    if y0 >= y1 or x0 >= x1:
        return dist, frac
    yy, xx = np.meshgrid(
        np.arange(y0, y1, dtype=np.float64) + 0.5,
        np.arange(x0, x1, dtype=np.float64) + 0.5,
        indexing="ij",
    )
    seg = np.diff(pts, axis=0)
    seglen = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    total = max(cum[-1], 1e-9)
    best = np.full(yy.shape, np.inf)
    best_s = np.zeros(yy.shape)
    for i in range(len(seg)):
        l2 = max(seglen[i] ** 2, 1e-12)
        t = np.clip(((yy - pts[i, 0]) * seg[i, 0] + (xx - pts[i, 1]) * seg[i, 1]) / l2, 0.0, 1.0)
        d = np.hypot(yy - pts[i, 0] - t * seg[i, 0], xx - pts[i, 1] - t * seg[i, 1])
        upd = d < best
        best = np.where(upd, d, best)
        best_s = np.where(upd, (cum[i] + t * seglen[i]) / total, best_s)
    dist[y0:y1, x0:x1] = best
    frac[y0:y1, x0:x1] = best_s
    return dist, frac


def _stroke(pts: np.ndarray, size: int, half_width: float, taper: float = 0.15):
    """Coverage of a tapered stroke along ``pts``, plus the distance, half-width and
    arc-length-fraction maps."""
    dist, frac = _polyline_distance(pts, size, half_width + 2.0)
    ends = np.minimum(frac, 1.0 - frac) / max(taper, 1e-6)
    hw = half_width * np.sqrt(np.clip(ends, 0.15, 1.0))
    cover = np.clip(hw + 0.5 - dist, 0.0, 1.0)
    return cover, dist, hw, frac


def _blob_sd(
    y: np.ndarray,
    x: np.ndarray,
    cy: float,
    cx: float,
    radius: float,
    rng: np.random.Generator,
    roughness: float,
    harmonics: int = 7,
) -> np.ndarray:
    """Approximate signed distance to an irregular star-shaped blob."""
    theta = np.arctan2(y - cy, x - cx)
    rho = np.hypot(y - cy, x - cx)
    k = np.arange(2, harmonics + 2)
    amp = roughness * rng.uniform(0.3, 1.0, len(k)) / k**0.8
    phase = rng.uniform(0, 2 * np.pi, len(k))
    r_theta = radius * (
        1.0
        + np.tensordot(
            np.cos(k[:, None, None] * theta + phase[:, None, None]).transpose(1, 2, 0), amp, axes=1
        )
    )
    return rho - np.maximum(r_theta, 0.2 * radius)


def _random_polygon(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """A jagged star-shaped polygon (a chipped-off piece) as ``(n, 2)`` ``(y, x)`` vertices."""
    n = int(rng.integers(7, 12))
    ang = (np.arange(n) + rng.uniform(0.15, 0.85, n)) / n * 2 * np.pi + rng.uniform(0, 2 * np.pi)
    r = radius * rng.uniform(0.55, 1.2, n)
    return centre[None, :] + r[:, None] * np.stack([np.sin(ang), np.cos(ang)], axis=1)


def _polygon_sd(y: np.ndarray, x: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (px) to a closed polygon, negative inside (even-odd rule)."""
    closed = np.concatenate([verts, verts[:1]], axis=0)
    dist, _ = _polyline_distance(closed, y.shape[0], np.inf)
    inside = np.zeros(y.shape, dtype=bool)
    for (y1, x1), (y2, x2) in zip(closed[:-1], closed[1:], strict=True):
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / ((y2 - y1) if y2 != y1 else 1e-12)
        inside ^= crosses & (x < x_at)
    return np.where(inside, -dist, dist)


def _lighting_and_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image brightness, colour tint, illumination gradient and sensor noise -> uint8."""
    size = img.shape[0]
    y, x = _grid(size)
    gain = 1.0 + rng.normal(0.0, 0.05)
    tint = 1.0 + rng.normal(0.0, 0.02, 3)
    ang = rng.uniform(0.0, 2 * np.pi)
    amp = rng.uniform(0.0, 0.10)
    ramp = 1.0 + amp * ((x - size / 2) * np.cos(ang) + (y - size / 2) * np.sin(ang)) / size
    sigma = rng.uniform(0.006, 0.012)
    noise = rng.standard_normal(img.shape) * sigma
    out = img * (gain * tint)[None, None, :] * ramp[..., None] + noise
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Scenes (normal images).
# --------------------------------------------------------------------------------------


@dataclass
class _Scene:
    img: np.ndarray  # (H, W, 3) float, before lighting/noise
    surface: np.ndarray  # (H, W) where defects may appear (1 everywhere for textures)
    bg: np.ndarray | None = None  # what shows where object material goes missing
    info: dict = field(default_factory=dict)


def _render_fabric(rng: np.random.Generator, size: int) -> _Scene:
    """A 3/1 twill (denim-like): indigo warp floats over three ecru weft picks."""
    s = size / 256.0
    y, x = _grid(size)
    period = size * rng.uniform(0.036, 0.041)
    ang = rng.normal(0.0, 0.03)
    wob = 0.15 * period
    u = x * np.cos(ang) + y * np.sin(ang) + rng.uniform(0, 8 * period)
    v = -x * np.sin(ang) + y * np.cos(ang) + rng.uniform(0, 8 * period)
    u = u + wob * _noise(rng, size, 30 * s)
    v = v + wob * _noise(rng, size, 30 * s)
    i, fu = np.divmod(u / period, 1.0)
    j, fv = np.divmod(v / period, 1.0)
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    k = (j - i) % 4
    warp_top = k != 0
    pu, pv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    along = np.sin(np.pi * np.clip((k - 1 + fv) / 3.0, 0.0, 1.0)) ** 0.35
    # Per-yarn brightness (yarn irregularity), slubs along the yarn, fibre texture.
    warp_b = 1.0 + 0.08 * rng.standard_normal(i.max() - i.min() + 1)
    weft_b = 1.0 + 0.06 * rng.standard_normal(j.max() - j.min() + 1)
    fib_warp = _aniso_noise(rng, size, (3.0 * s + 0.5, 0.6))
    fib_weft = _aniso_noise(rng, size, (0.6, 3.0 * s + 0.5))
    twist_w = 0.5 + 0.5 * np.sin(2 * np.pi * (2.5 * v / period + 1.2 * fu))
    twist_f = 0.5 + 0.5 * np.sin(2 * np.pi * (2.5 * u / period + 1.2 * fv))
    warp = pu**0.6 * (0.30 + 0.70 * along) * warp_b[i - i.min()]
    warp = warp * (0.86 + 0.14 * twist_w) * (1 + 0.10 * fib_warp)
    weft = pv**0.6 * (0.30 + 0.70 * pu**0.35) * weft_b[j - j.min()]
    weft = weft * (0.88 + 0.12 * twist_f) * (1 + 0.10 * fib_weft)
    indigo = np.array([0.21, 0.29, 0.48]) * rng.uniform(0.95, 1.05, 3)
    ecru = np.array([0.82, 0.79, 0.70]) * rng.uniform(0.96, 1.04, 3)
    lum = np.where(warp_top, warp, weft)
    col = np.where(warp_top[..., None], indigo, ecru)
    img = 0.05 + col * (0.18 + 0.95 * lum[..., None])
    img = img * (1.0 + 0.04 * _noise(rng, size, 50 * s))[..., None]
    img = ndimage.gaussian_filter(img, (0.5 * s + 0.2, 0.5 * s + 0.2, 0))
    return _Scene(img=img, surface=np.ones((size, size)), info={"thread_angle": ang})


def _render_wood(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    y, x = _grid(size)
    ang = rng.normal(0.0, 0.05)  # grain runs roughly vertically
    u = x * np.cos(ang) + y * np.sin(ang)
    v = -x * np.sin(ang) + y * np.cos(ang)
    period = size * rng.uniform(0.05, 0.065)
    warp = period * (1.6 * _noise(rng, size, 90 * s) + 0.05 * _noise(rng, size, 20 * s))
    drift = (
        rng.uniform(0.5, 1.5)
        * period
        * np.sin(2 * np.pi * v / (size * rng.uniform(0.8, 1.6)) + rng.uniform(0, 2 * np.pi))
    )
    phase = (u + warp + drift) / period + rng.uniform(0.0, 1.0)
    f = phase - np.floor(phase)
    # Earlywood darkens gradually into a latewood line that ends abruptly.
    late = 0.35 * f**2 + 0.75 * np.exp(-(1.0 - f) / 0.07) + 0.4 * np.exp(-f / 0.03)
    late = np.clip(late * (1.0 + 0.25 * _noise(rng, size, 25 * s)), 0.0, 1.2)
    pores = _aniso_noise(rng, size, (7.0 * s + 1.0, 0.5))
    pores_fine = _aniso_noise(rng, size, (2.0 * s + 0.5, 0.4))
    low = _noise(rng, size, 40 * s)
    t = np.clip(0.45 * late + 0.07 * pores + 0.05 * pores_fine + 0.08 * low + 0.12, 0.0, 1.0)
    light = np.array([0.80, 0.60, 0.40]) * rng.uniform(0.96, 1.04, 3)
    dark = np.array([0.50, 0.31, 0.17]) * rng.uniform(0.95, 1.05, 3)
    img = light * (1 - t[..., None]) + dark * t[..., None]
    img = ndimage.gaussian_filter(img, (0.4 * s + 0.2, 0.4 * s + 0.2, 0))
    return _Scene(img=img, surface=np.ones((size, size)), info={"grain_angle": ang})


def _render_hex_nut(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    y, x = _grid(size)
    # Background: dark slate-blue mat with a fine fabric-like grain.
    bg_col = np.array([0.15, 0.17, 0.20]) * rng.uniform(0.92, 1.08)
    bg_lum = 1.0 + 0.06 * _noise(rng, size, 40 * s) + 0.05 * _noise(rng, size, 0.8)
    cx = size / 2 + rng.normal(0.0, 0.02 * size)
    cy = size / 2 + rng.normal(0.0, 0.02 * size)
    rot = rng.normal(0.0, 0.12)
    apothem = 0.30 * size * rng.uniform(0.985, 1.015)
    corner = 0.03 * size

    def hex_sd(xx, yy):
        dx, dy = xx - cx, yy - cy
        px = dx * np.cos(rot) + dy * np.sin(rot)
        py = -dx * np.sin(rot) + dy * np.cos(rot)
        return _hexagon_sd(px, py, apothem, corner)

    off = np.array([4.0, 5.0]) * s
    shadow = ndimage.gaussian_filter(_aa(hex_sd(x - off[0], y - off[1])), 4.0 * s + 0.5)
    bg = bg_col[None, None, :] * (bg_lum * (1.0 - 0.55 * shadow))[..., None]

    dx, dy = x - cx, y - cy
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    r_face = 0.95 * apothem
    r_bore = 0.50 * apothem
    r_sink = r_bore + 0.11 * apothem
    r_through = 0.40 * apothem

    # Turning marks: concentric brushed rings (a 1-D noise over the radius).
    nb = int(rho.max() / s) + 4
    marks = ndimage.gaussian_filter1d(rng.standard_normal(nb), 1.2)
    marks = np.interp(rho / s, np.arange(nb, dtype=np.float64), marks)
    marks = marks / (marks.std() + 1e-9)
    sheen = np.cos(2.0 * (phi - _LIGHT_ANGLE - np.pi / 2)) ** 2
    face = 0.50 + 0.035 * marks + 0.16 * sheen
    # Chamfered corners (outside the face circle): a cone tilted outwards.
    tilt = 0.6
    d_out, _ = _shade(np.cos(phi) * tilt, np.sin(phi) * tilt, np.sqrt(1 - tilt**2) + 0 * phi)
    chamfer = 0.18 + 0.55 * d_out
    # Countersink: a cone tilted inwards.
    d_in, _ = _shade(-np.cos(phi) * tilt, -np.sin(phi) * tilt, np.sqrt(1 - tilt**2) + 0 * phi)
    sink = 0.12 + 0.60 * d_in
    # Thread inside the bore: rings, darker with depth.
    pitch = 0.035 * size
    depth = np.clip((rho - r_through) / (r_bore - r_through), 0.0, 1.0)
    thread = (0.10 + 0.30 * depth**1.5) * (0.65 + 0.35 * np.sin(2 * np.pi * rho / pitch + rot))
    thread = thread * (0.7 + 0.5 * d_in)

    lum = np.where(rho < r_bore, thread, np.where(rho < r_sink, sink, face))
    w_face = _aa(rho - r_face, 1.5)
    lum = np.where(rho < r_sink, lum, w_face * face + (1 - w_face) * chamfer)
    metal = np.array([0.98, 0.97, 0.93]) * rng.uniform(0.985, 1.015, 3)
    obj_img = lum[..., None] * metal
    # Dark bevel along the outer rim.
    edge = np.clip(1.0 - np.abs(hex_sd(x, y) + 1.0 * s) / (1.2 * s + 0.3), 0.0, 1.0)
    obj_img = obj_img * (1.0 - 0.35 * edge)[..., None]
    obj = _aa(hex_sd(x, y)) * (1.0 - _aa(rho - r_through))
    img = obj[..., None] * obj_img + (1 - obj[..., None]) * bg
    surface = obj * (rho > r_sink + 1.0)
    return _Scene(img=img, surface=surface, bg=bg, info={"obj": obj})


def _render_capsule(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    y, x = _grid(size)
    bg_lum = rng.uniform(0.74, 0.82) * (
        1.0 + 0.02 * _noise(rng, size, 50 * s) + 0.015 * _noise(rng, size, 0.8)
    )
    bg_col = np.array([1.0, 0.985, 0.95])
    cx = size / 2 + rng.normal(0.0, 0.02 * size)
    cy = size / 2 + rng.normal(0.0, 0.02 * size)
    ang = rng.normal(0.0, 0.06)
    half = 0.25 * size * rng.uniform(0.985, 1.015)
    r = 0.13 * size * rng.uniform(0.985, 1.015)
    rc = 1.045 * r
    seam = 0.06 * half
    ca, sa = np.cos(ang), np.sin(ang)

    def parts(xx, yy):
        dx, dy = xx - cx, yy - cy
        a = dx * ca + dy * sa
        b = -dx * sa + dy * ca
        sd_cap = np.maximum(_stadium_sd(a, b, -half, seam, rc), a - seam)
        sd_body = _stadium_sd(a, b, seam - 0.3 * half, half, r)
        return a, b, sd_cap, sd_body

    off = np.array([3.0, 6.0]) * s
    _, _, sc, sb = parts(x - off[0], y - off[1])
    shadow = ndimage.gaussian_filter(_aa(np.minimum(sc, sb)), 5.0 * s + 0.5)
    bg = (bg_lum * (1.0 - 0.30 * shadow))[..., None] * bg_col

    a, b, sd_cap, sd_body = parts(x, y)

    def normals(a0, a1, rad):
        qa = (a - np.clip(a, a0, a1)) / rad
        qb = b / rad
        q2 = np.clip(qa**2 + qb**2, 0.0, 0.999)
        scale = np.sqrt(q2 / np.maximum(qa**2 + qb**2, 1e-12))
        qa, qb = qa * scale, qb * scale
        nx = qa * ca - qb * sa
        ny = qa * sa + qb * ca
        return nx, ny, np.sqrt(1.0 - q2)

    cap_col = np.array([0.80, 0.16, 0.12]) * rng.uniform(0.95, 1.05, 3)
    body_col = np.array([0.94, 0.91, 0.82]) * rng.uniform(0.98, 1.02, 3)
    d_c, s_c = _shade(*normals(-half, seam, rc), shininess=50.0)
    d_b, s_b = _shade(*normals(seam - 0.3 * half, half, r), shininess=50.0)
    cap_img = cap_col * (0.30 + 0.75 * d_c)[..., None] + 0.55 * s_c[..., None]
    body_img = body_col * (0.28 + 0.72 * d_b)[..., None] + 0.45 * s_b[..., None]
    # The cap's lip casts a thin dark line on the body.
    lip = np.clip(1.0 - (a - seam) / (2.0 * s + 0.5), 0.0, 1.0) * (a >= seam)
    body_img = body_img * (1.0 - 0.35 * lip)[..., None]
    a_cap, a_body = _aa(sd_cap), _aa(sd_body)
    obj_img = a_cap[..., None] * cap_img + (1 - a_cap[..., None]) * body_img
    obj = 1.0 - (1.0 - a_cap) * (1.0 - a_body)
    img = obj[..., None] * obj_img + (1 - obj[..., None]) * bg
    return _Scene(img=img, surface=obj, bg=bg, info={"obj": obj})


# --------------------------------------------------------------------------------------
# Defects. Each returns (new_img, coverage) where coverage in [0, 1] is how strongly each
# pixel was altered; pixels with coverage 0 are left exactly unchanged.
# --------------------------------------------------------------------------------------


def _pick_point(rng: np.random.Generator, scene: _Scene, margin: float, erode: float = 0.0):
    """A random pixel centre on the scene's surface, ``margin`` px from the image border."""
    size = scene.surface.shape[0]
    ok = scene.surface >= 0.99
    if erode > 0 and not ok.all():
        ok = ndimage.distance_transform_edt(ok) > erode
    m = int(np.ceil(margin))
    border = np.zeros_like(ok)
    border[m : size - m, m : size - m] = True
    ok = ok & border
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return np.array([size / 2, size / 2])
    k = idx[rng.integers(len(idx))]
    return np.array([k // size + 0.5, k % size + 0.5]) + rng.uniform(-0.5, 0.5, 2)


def _on_surface(cover: np.ndarray, surface: np.ndarray):
    """Restrict a defect to the object's surface. Returns the blend weight and the coverage
    used for the mask, which keeps object-outline pixels the defect touches however little."""
    return cover * surface, cover * (surface >= 0.05)


def _blend(img: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return img * (1.0 - alpha[..., None]) + target * alpha[..., None]


def _defect_scratch(scene: _Scene, rng: np.random.Generator, *, style: str):
    """One to three thin, nearly parallel bright scratches."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    start = _pick_point(rng, scene, 0.2 * size, erode=4 * s)
    heading = rng.uniform(0, 2 * np.pi)
    length = size * rng.uniform(0.28, 0.45)
    base = _curve(rng, start, heading, length, 2.0 * s + 0.5, 0.02, 6.0)
    base = base - (base[-1] - base[0]) / 2.0  # centre the stroke on the picked point
    cover = np.zeros((size, size))
    for k in range(int(rng.integers(1, 4))):
        shift = np.array([-np.sin(heading), np.cos(heading)]) * k * rng.uniform(4, 7) * s
        n = len(base)
        lo, hi = int(rng.uniform(0, 0.25) * n), int(rng.uniform(0.75, 1.0) * n)
        pts = base[lo : max(hi, lo + 3)] + shift
        hw = rng.uniform(1.0, 1.5) * s + 0.3 if k == 0 else rng.uniform(0.7, 1.1) * s + 0.3
        c, _, _, _ = _stroke(pts, size, hw, taper=0.2)
        cover = np.maximum(cover, c)
    alpha, cover = _on_surface(cover, scene.surface)
    # Wood: the pale fibres under the finish; metal: a bright specular groove.
    colour = [0.93, 0.82, 0.64] if style == "wood" else [0.97, 0.97, 0.95]
    target = np.broadcast_to(np.array(colour), img.shape)
    return _blend(img, target, 0.9 * alpha), cover


def _crack_cover(rng, size, start, heading, scale, hw0):
    s = size / 256.0
    main = _curve(rng, start, heading, scale, 2.0 * s + 0.6, 0.05, 3.0, zigzag=0.25)
    main = main - (main[-1] - main[0]) / 2.0
    cover, _, _, _ = _stroke(main, size, hw0, taper=0.35)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(len(main) // 5, 4 * len(main) // 5))
        d = main[min(k + 1, len(main) - 1)] - main[k]
        h = np.arctan2(d[0], d[1]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
        br = _curve(rng, main[k], h, scale * rng.uniform(0.2, 0.45), 2.0 * s + 0.6, 0.05, 3.0, 0.25)
        c, _, _, _ = _stroke(br, size, hw0 * rng.uniform(0.55, 0.8), taper=0.5)
        cover = np.maximum(cover, c)
    return cover


def _defect_crack(scene: _Scene, rng: np.random.Generator, *, along_grain: bool):
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    start = _pick_point(rng, scene, 0.25 * size, erode=6 * s)
    if along_grain:
        heading = np.pi / 2 + scene.info.get("grain_angle", 0.0) + rng.normal(0.0, 0.15)
        length = size * rng.uniform(0.30, 0.50)
    else:
        heading = rng.uniform(0, 2 * np.pi)
        length = size * rng.uniform(0.18, 0.32)
    cover = _crack_cover(rng, size, start, heading, length, rng.uniform(1.2, 1.8) * s + 0.3)
    alpha, cover = _on_surface(cover, scene.surface)
    target = img * 0.18
    return _blend(img, target, 0.95 * alpha), cover


def _defect_hole(scene: _Scene, rng: np.random.Generator, *, style: str):
    """A dark round pit with a raised, lit rim (wood) or a torn hole in a fabric."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    y, x = _grid(size)
    c = _pick_point(rng, scene, 0.12 * size)
    theta = np.arctan2(y - c[0], x - c[1])
    towards_light = np.cos(theta - _LIGHT_ANGLE)
    if style == "fabric":
        radius = size * rng.uniform(0.04, 0.065)
        sd = _blob_sd(y, x, c[0], c[1], radius, rng, 0.3)
        sd = _sdf(sd + (1.2 * s + 0.3) * _noise(rng, size, 0.8) < 0)  # ragged, torn outline
        hole = _aa(sd)
        rho_rel = np.clip(np.hypot(y - c[0], x - c[1]) / radius, 0.0, 1.0)
        inner = 0.06 + 0.10 * rho_rel**2 * np.clip(-towards_light, 0.2, 1.0)
        target = inner[..., None] * np.array([0.9, 0.95, 1.1])
        out = _blend(img, target, hole)
        # Broken yarn ends poking into the hole along the weave directions.
        ang = scene.info.get("thread_angle", 0.0)
        ends = np.zeros((size, size))
        for _ in range(int(rng.integers(4, 9))):
            phi = rng.uniform(0, 2 * np.pi)
            p0 = c + radius * 1.05 * np.array([np.sin(phi), np.cos(phi)])
            d = ang + np.pi / 2 * np.round((phi + np.pi - ang) / (np.pi / 2))
            pts = _curve(rng, p0, d, radius * rng.uniform(0.3, 0.7), 1.0 * s + 0.5, 0.05, 2.0)
            cov, _, _, _ = _stroke(pts, size, rng.uniform(0.8, 1.3) * s + 0.3, taper=0.4)
            ends = np.maximum(ends, cov)
        yarn = np.array([0.62, 0.62, 0.60]) * rng.uniform(0.85, 1.1)
        out = _blend(out, np.broadcast_to(yarn, img.shape), 0.9 * ends)
        # Frayed, fluffed-up rim around the tear.
        rim_w = 2.5 * s + 1.0
        rim = _aa(sd - rim_w) * (1 - hole)
        fluff = np.clip(0.6 + 0.4 * _noise(rng, size, 0.7), 0.0, 1.0)
        out = _blend(
            out, np.broadcast_to(np.array([0.78, 0.78, 0.76]), img.shape), 0.7 * rim * fluff
        )
        return out, np.maximum(np.maximum(hole, rim), ends)
    radius = size * rng.uniform(0.028, 0.045)
    sd = _blob_sd(y, x, c[0], c[1], radius, rng, 0.12, harmonics=4)
    rim_w = 0.5 * radius + 1.0
    pit = _aa(sd)
    rho_rel = np.clip(np.hypot(y - c[0], x - c[1]) / radius, 0.0, 1.0)
    # Inside: the wall away from the light catches some light, the bottom is dark.
    inner = 0.05 + 0.22 * np.clip(-towards_light, 0.0, 1.0) * rho_rel**2
    target = inner[..., None] * np.array([0.55, 0.38, 0.25])
    out = _blend(img, target, pit)
    # Rim: raised material around the pit, brighter on the side facing the light.
    rim = np.clip(1.0 - sd / rim_w, 0.0, 1.0) * (sd > -0.5) * (1 - pit)
    gain = 1.0 + 0.45 * np.clip(towards_light, -0.6, 1.0)
    out = out * (1.0 + (gain - 1.0) * rim)[..., None]
    return out, np.maximum(pit, rim)


def _stain_cover(rng, scene, size, radius_range, soft):
    s = size / 256.0
    y, x = _grid(size)
    c = _pick_point(rng, scene, 0.15 * size)
    radius = size * rng.uniform(*radius_range)
    rho2 = ((y - c[0]) ** 2 + (x - c[1]) ** 2) / radius**2
    field_ = 1.0 - rho2 + 0.45 * _noise(rng, size, 0.35 * radius)
    inside = field_ > 0
    lab, _ = ndimage.label(inside)
    centre_lab = lab[int(np.clip(c[0], 0, size - 1)), int(np.clip(c[1], 0, size - 1))]
    if centre_lab > 0:
        inside = lab == centre_lab
    sd = _sdf(inside)
    if soft:
        fade = min(0.2 * radius, 4.0 * s + 1.0)
        cover = _smoothstep(-0.5, fade, -sd)
        profile = cover
    else:
        cover = _aa(sd)
        ring_w = 2.5 * s + 0.8
        profile = cover * (0.55 + 0.45 * np.exp(np.minimum(sd, 0.0) / ring_w))
    return cover, profile


def _defect_stain(scene: _Scene, rng: np.random.Generator):
    """A soft-edged or ring-edged (dried) colour blotch on a fabric."""
    img = scene.img
    size = img.shape[0]
    soft = bool(rng.integers(2))
    cover, profile = _stain_cover(rng, scene, size, (0.07, 0.12), soft)
    tints = np.array([[0.62, 0.42, 0.22], [0.60, 0.22, 0.30], [0.38, 0.38, 0.36]])
    tint = tints[rng.integers(len(tints))] * rng.uniform(0.9, 1.1)
    strength = rng.uniform(0.75, 0.95)
    a = (profile * strength)[..., None]
    out = img * (1.0 - a) + img * tint * 1.1 * a
    return out, cover


def _defect_rust(scene: _Scene, rng: np.random.Generator):
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    cover, _ = _stain_cover(rng, scene, size, (0.05, 0.10), soft=True)
    alpha, cover = _on_surface(cover, scene.surface)
    grain = _noise(rng, size, 1.0 * s + 0.4)
    spots = _noise(rng, size, 3.0 * s + 0.5)
    lum = img.mean(axis=2, keepdims=True)
    col = np.array([0.62, 0.30, 0.12]) * rng.uniform(0.9, 1.1)
    target = col * (0.5 + 0.6 * lum + 0.10 * grain[..., None] + 0.08 * spots[..., None])
    return _blend(img, target, 0.9 * alpha), cover


def _defect_thread(scene: _Scene, rng: np.random.Generator):
    """A stray fibre lying on the fabric (extra material)."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    start = _pick_point(rng, scene, 0.25 * size)
    length = size * rng.uniform(0.30, 0.55)
    pts = _curve(rng, start, rng.uniform(0, 2 * np.pi), length, 1.5 * s + 0.5, 0.06, 5.0)
    pts = pts - (pts[-1] - pts[0]) / 2.0
    hw = rng.uniform(1.1, 1.6) * s + 0.3
    cover, dist, hwmap, frac = _stroke(pts, size, hw, taper=0.05)
    cols = np.array([[0.08, 0.08, 0.09], [0.70, 0.10, 0.10], [0.95, 0.93, 0.85]])
    col = cols[rng.integers(len(cols))]
    twist = 0.8 + 0.2 * np.sin(frac * length / (2.5 * s + 0.5) * 2 * np.pi)
    roundness = np.sqrt(np.clip(1.0 - (dist / np.maximum(hwmap, 0.5)) ** 2, 0.0, 1.0))
    target = col * (0.55 + 0.45 * roundness * twist)[..., None] + 0.05
    return _blend(img, target, cover), cover


def _defect_missing(scene: _Scene, rng: np.random.Generator):
    """A chunk broken off the object's outline: background shows where material was."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    y, x = _grid(size)
    obj = scene.info["obj"]
    solid = obj >= 0.5
    edge = solid & ~ndimage.binary_erosion(solid)
    outer = ndimage.binary_fill_holes(solid)
    edge &= ~ndimage.binary_erosion(outer, iterations=2)  # outer outline only
    idx = np.flatnonzero(edge)
    cen = np.array(ndimage.center_of_mass(outer)) + 0.5
    for _attempt in range(10):  # retry chips that would only graze the outline
        k = idx[rng.integers(len(idx))]
        p = np.array([k // size + 0.5, k % size + 0.5])
        out_dir = (p - cen) / (np.linalg.norm(p - cen) + 1e-9)
        radius = size * rng.uniform(0.065, 0.10)
        c = p + out_dir * radius * rng.uniform(0.0, 0.35)
        sd = _polygon_sd(y, x, _random_polygon(rng, c, radius))
        cut = _aa(sd)
        removed = cut * obj
        if removed.sum() >= 0.8 * radius**2:
            break
    out = _blend(img, scene.bg, removed)
    # Fracture face: a thin rough band along the new edge.
    band = np.clip(1.0 - np.abs(sd - 1.0 * s) / (1.5 * s + 0.5), 0.0, 1.0) * (sd > 0)
    band = band * (obj >= 0.99)
    rough = 0.7 + 0.3 * np.clip(_noise(rng, size, 0.8), -1, 1)
    out = out * (1.0 - 0.55 * band * rough)[..., None]
    # The mask is where material was removed, including partly covered outline pixels.
    return out, np.maximum(np.maximum(removed, band), cut * (obj >= 0.1))


def _defect_contamination(scene: _Scene, rng: np.random.Generator):
    """A lump of foreign material stuck on the object."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    y, x = _grid(size)
    c = _pick_point(rng, scene, 0.1 * size, erode=6 * s)
    radius = size * rng.uniform(0.03, 0.055)
    sd = _blob_sd(y, x, c[0], c[1], radius, rng, 0.35)
    cover = _aa(sd)
    height = np.sqrt(np.clip(-sd / radius, 0.0, 1.0)) * radius * 0.6
    gy, gx = np.gradient(ndimage.gaussian_filter(height, 1.0))
    n = np.sqrt(gx**2 + gy**2 + 1.0)
    diffuse, spec = _shade(-gx / n, -gy / n, 1.0 / n, shininess=20.0)
    cols = np.array([[0.30, 0.22, 0.14], [0.22, 0.22, 0.24], [0.45, 0.40, 0.20]])
    col = cols[rng.integers(len(cols))]
    grain = 1.0 + 0.15 * _noise(rng, size, 0.8)
    target = col * ((0.35 + 0.8 * diffuse) * grain)[..., None] + 0.15 * spec[..., None]
    return _blend(img, target, cover), cover


# --------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ClassSpec:
    name: str
    kind: str
    description: str
    render: Callable[[np.random.Generator, int], _Scene]
    defects: dict[str, tuple[str, Callable[[_Scene, np.random.Generator], tuple]]]


_SPECS: dict[str, _ClassSpec] = {
    spec.name: spec
    for spec in [
        _ClassSpec(
            "fabric",
            "texture",
            "3/1 twill, denim-like: indigo warp floats over ecru weft, yarn irregularity",
            _render_fabric,
            {
                "hole": (
                    "a torn hole showing the dark backing, with frayed bright fibres",
                    lambda sc, r: _defect_hole(sc, r, style="fabric"),
                ),
                "stain": (
                    "a coffee, wine or oil stain with a soft or dried ring edge",
                    _defect_stain,
                ),
                "thread": ("a stray dark, red or white fibre lying on the cloth", _defect_thread),
            },
        ),
        _ClassSpec(
            "wood",
            "texture",
            "wood grain: warped growth rings, latewood lines and pores, grain roughly vertical",
            _render_wood,
            {
                "scratch": (
                    "one to three thin bright curved scratches",
                    lambda sc, r: _defect_scratch(sc, r, style="wood"),
                ),
                "crack": (
                    "a dark jagged crack along the grain with branches",
                    lambda sc, r: _defect_crack(sc, r, along_grain=True),
                ),
                "hole": (
                    "a dark round pit with a raised rim lit from the upper left",
                    lambda sc, r: _defect_hole(sc, r, style="wood"),
                ),
            },
        ),
        _ClassSpec(
            "hex_nut",
            "object",
            "a zinc-plated hex nut seen from above on a dark mat, small shifts and rotations",
            _render_hex_nut,
            {
                "scratch": (
                    "thin bright scratches across the face",
                    lambda sc, r: _defect_scratch(sc, r, style="metal"),
                ),
                "missing": ("a chunk broken off the outline, background showing", _defect_missing),
                "rust": ("an orange-brown granular rust patch on the face", _defect_rust),
            },
        ),
        _ClassSpec(
            "capsule",
            "object",
            "a shiny red/ivory gelatin capsule on light paper, small shifts and rotations",
            _render_capsule,
            {
                "crack": (
                    "dark branching cracks in the shell",
                    lambda sc, r: _defect_crack(sc, r, along_grain=False),
                ),
                "missing": ("a chunk broken off the capsule, background showing", _defect_missing),
                "contamination": (
                    "a lump of dark foreign material stuck on the capsule",
                    _defect_contamination,
                ),
            },
        ),
    ]
}

DEMO_CLASSES: tuple[str, ...] = tuple(_SPECS)
DEMO_DEFECTS: dict[str, tuple[str, ...]] = {n: tuple(sp.defects) for n, sp in _SPECS.items()}


# --------------------------------------------------------------------------------------
# Per-image rendering (deterministic).
# --------------------------------------------------------------------------------------


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _rngs(seed: int, cls: str, split: str, kind: str, index: int):
    ss = np.random.SeedSequence([int(seed), _key(cls), _key(split), _key(kind), int(index)])
    scene_ss, defect_ss = ss.spawn(2)
    return np.random.default_rng(scene_ss), np.random.default_rng(defect_ss)


def _render_sample(
    cls: str, split: str, kind: str, index: int, *, seed: int = 0, image_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Render one image; the internal hook the tests use to check masks.

    Returns ``(clean, image, mask)``: uint8 ``(H, W, 3)`` images and a uint8 0/255 mask.
    ``clean`` is the same image without the defect (the same as ``image`` for ``good``);
    ``mask`` is ``None`` for ``good``.
    """
    spec = _SPECS[cls]
    scene_rng, defect_rng = _rngs(seed, cls, split, kind, index)
    scene = spec.render(scene_rng, image_size)
    finish_state = scene_rng.bit_generator.state
    clean = _lighting_and_noise(scene.img, scene_rng)
    if kind == "good":
        return clean, clean, None
    _, fn = spec.defects[kind]
    min_area = max(12.0, 0.0015 * image_size * image_size)
    for _attempt in range(20):
        img, cover = fn(scene, defect_rng)
        mask = cover >= _MASK_THRESHOLD
        if mask.sum() >= min_area:
            break
    scene_rng.bit_generator.state = finish_state
    image = _lighting_and_noise(img, scene_rng)
    return clean, image, (mask.astype(np.uint8) * 255)


# --------------------------------------------------------------------------------------
# Dataset building.
# --------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """``$GRAD_JAX_CACHE`` (or ``~/.cache/grad_jax``) ``/demo/<DEMO_VERSION>``."""
    base = os.environ.get("GRAD_JAX_CACHE") or os.path.join("~", ".cache", "grad_jax")
    return pathlib.Path(base).expanduser() / "demo" / DEMO_VERSION


def _expected_marker(classes, num_train, num_test_good, num_test_defect, image_size, seed):
    num_images = sum(
        num_train + num_test_good + num_test_defect * len(_SPECS[c].defects) for c in classes
    )
    return {
        "version": DEMO_VERSION,
        "classes": list(classes),
        "defects": {c: list(_SPECS[c].defects) for c in classes},
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_defect": num_test_defect,
        "image_size": image_size,
        "seed": seed,
        "num_images": num_images,
    }


def _read_marker(root: pathlib.Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _readme(marker: dict) -> str:
    lines = [
        "grad_jax demo dataset (synthetic, generated locally; no download)",
        "",
        f"Generator version {marker['version']}, seed {marker['seed']}, "
        f"{marker['image_size']}x{marker['image_size']} RGB PNG, MVTec AD layout:",
        "  <class>/train/good/NNN.png            normal training images",
        "  <class>/test/good/NNN.png             normal test images",
        "  <class>/test/<defect>/NNN.png         defective test images",
        "  <class>/ground_truth/<defect>/NNN_mask.png   pixel masks (0 / 255)",
        "",
        f"Per class: {marker['num_train']} train, {marker['num_test_good']} test good, "
        f"{marker['num_test_defect']} test images per defect type "
        f"({marker['num_images']} images in all).",
        "",
        "Classes:",
    ]
    for name in marker["classes"]:
        spec = _SPECS[name]
        lines.append(f"  {name} ({spec.kind}): {spec.description}")
        for d, (desc, _) in spec.defects.items():
            lines.append(f"    - {d}: {desc}")
    lines += [
        "",
        "Normal images vary in position/rotation (objects), texture phase and period,",
        "brightness, colour tint, illumination gradient and sensor noise. Masks mark",
        "exactly the pixels a defect changed.",
        "",
        "Regenerate with grad_jax.demo_data.generate_demo_dataset(root).",
        "",
    ]
    return "\n".join(lines)


def _jobs(
    classes, num_train, num_test_good, num_test_defect
) -> Iterator[tuple[str, str, str, int]]:
    for cls in classes:
        for i in range(num_train):
            yield cls, "train", "good", i
        for i in range(num_test_good):
            yield cls, "test", "good", i
        for d in _SPECS[cls].defects:
            for i in range(num_test_defect):
                yield cls, "test", d, i


def _save_png(path: pathlib.Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def _is_replaceable(root: pathlib.Path) -> bool:
    """Only an empty folder or one that holds (part of) a demo dataset may be replaced."""
    if not root.exists() and not root.is_symlink():
        return True
    if not root.is_dir() or root.is_symlink():
        return False
    if _read_marker(root) is not None:
        return True
    allowed = set(DEMO_CLASSES) | {_README, _MARKER}
    return all(p.name in allowed for p in root.iterdir())


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def generate_demo_dataset(
    root,
    *,
    classes: Sequence[str] | None = None,
    num_train: int | None = None,
    num_test_good: int | None = None,
    num_test_defect: int | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
) -> pathlib.Path:
    """Render the demo dataset into ``root`` (replacing a previous demo build there).

    ``None`` counts mean the defaults (60 train, 15 test good, 10 per defect type). The
    images are written to a temporary sibling folder that is renamed to ``root`` once
    complete; the ``.complete`` marker (JSON: version and counts) is written last.
    Refuses to replace an existing folder that does not look like a demo dataset.
    """
    root = pathlib.Path(root).expanduser()
    classes = tuple(DEMO_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in _SPECS]
    if unknown or not classes:
        raise ValueError(f"unknown demo classes {unknown}; choose from {DEMO_CLASSES}")
    num_train = _check_count("num_train", DEFAULT_NUM_TRAIN if num_train is None else num_train)
    num_test_good = _check_count(
        "num_test_good", DEFAULT_NUM_TEST_GOOD if num_test_good is None else num_test_good
    )
    num_test_defect = _check_count(
        "num_test_defect", DEFAULT_NUM_TEST_DEFECT if num_test_defect is None else num_test_defect
    )
    image_size = _check_count("image_size", image_size)
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    seed = _check_count("seed", seed)
    if not _is_replaceable(root):
        raise FileExistsError(
            f"{root} exists and is not a grad_jax demo dataset; refusing to replace it"
        )

    marker = _expected_marker(classes, num_train, num_test_good, num_test_defect, image_size, seed)
    before = _read_marker(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        jobs = list(_jobs(classes, num_train, num_test_good, num_test_defect))
        bar = tqdm(total=len(jobs), desc="building demo dataset", unit="img", disable=not progress)
        with bar:
            for cls, split, kind, index in jobs:
                _, image, mask = _render_sample(
                    cls, split, kind, index, seed=seed, image_size=image_size
                )
                out_dir = tmp / cls / split / kind
                out_dir.mkdir(parents=True, exist_ok=True)
                _save_png(out_dir / f"{index:03d}.png", image)
                if mask is not None:
                    gt_dir = tmp / cls / "ground_truth" / kind
                    gt_dir.mkdir(parents=True, exist_ok=True)
                    _save_png(gt_dir / f"{index:03d}_mask.png", mask)
                bar.update(1)
        (tmp / _README).write_text(_readme(marker), encoding="utf-8")
        (tmp / _MARKER).write_text(
            json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if before != marker and _read_marker(root) == marker:
            # Another process finished the very same (deterministic) build meanwhile: keep
            # its folder, which may already be in use, and drop ours.
            return root
        _move_into_place(tmp, root, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: pathlib.Path, root: pathlib.Path, marker: dict) -> None:
    old = None
    if root.exists() or root.is_symlink():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished the same build first; identical content is fine.
        if _read_marker(root) != marker:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def ensure_demo_dataset(root=None, *, progress: bool = True) -> pathlib.Path:
    """Return the default demo dataset's folder, building it on first use.

    ``root`` defaults to :func:`default_cache_dir`. An existing build is reused when its
    ``.complete`` marker matches the current version and default counts; otherwise (no
    marker, an interrupted build, another version) the folder is rebuilt.
    """
    root = pathlib.Path(default_cache_dir() if root is None else root).expanduser()
    kwargs = dict(
        classes=DEMO_CLASSES,
        num_train=DEFAULT_NUM_TRAIN,
        num_test_good=DEFAULT_NUM_TEST_GOOD,
        num_test_defect=DEFAULT_NUM_TEST_DEFECT,
        image_size=DEFAULT_IMAGE_SIZE,
        seed=0,
    )
    if _read_marker(root) == _expected_marker(**kwargs):
        return root
    _LOG.info("Building the grad_jax demo dataset in %s (one-off, about 20 s).", root)
    return generate_demo_dataset(root, progress=progress, **kwargs)
