"""Low-level drawing helpers of the demo generator, all vectorised numpy on ``(H, W)`` grids.

Smooth noise, signed distances (``< 0`` inside, in px) and their anti-aliased fill, Blinn-Phong
shading under one fixed light, random curves and tapered strokes, blobs and polygons, and the
per-image lighting and sensor noise that turns a float ``(H, W, 3)`` scene into uint8.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Light comes from the upper left (image x right, y down, z towards the camera).
_LIGHT = np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])
_HALF = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + np.array([0.0, 0.0, 1.0]))
LIGHT_ANGLE = float(np.arctan2(_LIGHT[1], _LIGHT[0]))


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Smooth zero-mean unit-variance ``(size, size)`` noise, correlation length ~``scale`` px."""
    if scale <= 3.0:
        n = ndimage.gaussian_filter(rng.standard_normal((size, size)), scale, mode="wrap")
    else:
        f = scale / 2.0
        m = int(np.ceil(size / f)) + 6
        small = ndimage.gaussian_filter(rng.standard_normal((m, m)), 1.5, mode="wrap")
        n = _upsample_cubic(small, size, f, 3.0)
    n = n - n.mean()
    return n / (n.std() + 1e-12)


def aniso_noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean unit-variance ``(size, size)`` noise smoothed by ``sigma = (sy, sx)`` px."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    n = n - n.mean()
    return n / (n.std() + 1e-12)


def fill(sd: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of the region ``sd < 0`` (``sd`` a signed distance in px)."""
    return np.clip(0.5 - sd / width, 0.0, 1.0)


def signed_distance(inside: np.ndarray) -> np.ndarray:
    """Approximate signed distance (px) to the boundary of a boolean region."""
    if not inside.any():
        return np.full(inside.shape, np.inf)
    if inside.all():
        return np.full(inside.shape, -np.inf)
    out = ndimage.distance_transform_edt(~inside)
    inn = ndimage.distance_transform_edt(inside)
    return np.where(inside, -(inn - 0.5), out - 0.5)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Hermite ramp of ``x`` from 0 at ``e0`` to 1 at ``e1`` (same shape as ``x``)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def stadium_sd(a: np.ndarray, b: np.ndarray, a0: float, a1: float, r: float) -> np.ndarray:
    """Signed distance to a capsule whose axis runs along ``a`` from ``a0`` to ``a1``."""
    return np.hypot(a - np.clip(a, a0, a1), b) - r


def hexagon_sd(px: np.ndarray, py: np.ndarray, apothem: float, corner: float) -> np.ndarray:
    """Signed distance to a rounded regular hexagon (flat sides top and bottom)."""
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    r = apothem - corner
    px, py = np.abs(px), np.abs(py)
    d = 2.0 * np.minimum(kx * px + ky * py, 0.0)
    px, py = px - d * kx, py - d * ky
    px = px - np.clip(px, -kz * r, kz * r)
    py = py - r
    return np.hypot(px, py) * np.sign(py) - corner


def shade(
    nx: np.ndarray, ny: np.ndarray, nz: np.ndarray, shininess: float = 40.0
) -> tuple[np.ndarray, np.ndarray]:
    """Diffuse and Blinn-Phong specular terms (each in [0, 1]) for unit normals ``(nx, ny, nz)``
    under the fixed upper-left light."""
    diffuse = np.clip(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0.0, 1.0)
    spec = np.clip(nx * _HALF[0] + ny * _HALF[1] + nz * _HALF[2], 0.0, 1.0) ** shininess
    return diffuse, spec


def random_curve(
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


def polyline_distance(pts: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance from every pixel to the ``(n, 2)`` polyline ``pts``, and the arc-length fraction
    of the nearest point, as two ``(size, size)`` maps. Pixels farther than ``margin`` from
    the polyline's bounding box get ``inf``."""
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


def stroke(
    pts: np.ndarray, size: int, half_width: float, taper: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coverage of a tapered stroke along ``pts``, plus the distance, half-width and
    arc-length-fraction maps (all ``(size, size)``)."""
    dist, frac = polyline_distance(pts, size, half_width + 2.0)
    ends = np.minimum(frac, 1.0 - frac) / max(taper, 1e-6)
    hw = half_width * np.sqrt(np.clip(ends, 0.15, 1.0))
    cover = np.clip(hw + 0.5 - dist, 0.0, 1.0)
    return cover, dist, hw, frac


def blob_sd(
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


def random_polygon(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """A jagged star-shaped polygon (a chipped-off piece) as ``(n, 2)`` ``(y, x)`` vertices."""
    n = int(rng.integers(7, 12))
    ang = (np.arange(n) + rng.uniform(0.15, 0.85, n)) / n * 2 * np.pi + rng.uniform(0, 2 * np.pi)
    r = radius * rng.uniform(0.55, 1.2, n)
    return centre[None, :] + r[:, None] * np.stack([np.sin(ang), np.cos(ang)], axis=1)


def polygon_sd(y: np.ndarray, x: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (px) to a closed polygon, negative inside (even-odd rule)."""
    closed = np.concatenate([verts, verts[:1]], axis=0)
    dist, _ = polyline_distance(closed, y.shape[0], np.inf)
    inside = np.zeros(y.shape, dtype=bool)
    for (y1, x1), (y2, x2) in zip(closed[:-1], closed[1:], strict=True):
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / ((y2 - y1) if y2 != y1 else 1e-12)
        inside ^= crosses & (x < x_at)
    return np.where(inside, -dist, dist)


def lighting_and_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image brightness, colour tint, illumination gradient and sensor noise -> uint8."""
    size = img.shape[0]
    y, x = grid(size)
    gain = 1.0 + rng.normal(0.0, 0.05)
    tint = 1.0 + rng.normal(0.0, 0.02, 3)
    ang = rng.uniform(0.0, 2 * np.pi)
    amp = rng.uniform(0.0, 0.10)
    ramp = 1.0 + amp * ((x - size / 2) * np.cos(ang) + (y - size / 2) * np.sin(ang)) / size
    sigma = rng.uniform(0.006, 0.012)
    sensor_noise = rng.standard_normal(img.shape) * sigma
    out = img * (gain * tint)[None, None, :] * ramp[..., None] + sensor_noise
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
