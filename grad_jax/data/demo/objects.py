"""Scene renderers of the demo generator: the normal (defect-free) image of each class.

Each ``render_<class>(rng, size)`` draws one randomly varied scene from ``rng`` and returns a
:class:`Scene` whose image is still float and unlit (``textures.lighting_and_noise`` finishes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from grad_jax.data.demo.textures import (
    LIGHT_ANGLE,
    aniso_noise,
    fill,
    grid,
    hexagon_sd,
    noise,
    shade,
    stadium_sd,
)


@dataclass
class Scene:
    """One rendered normal image and what the defect painters need to know about it."""

    img: np.ndarray  # (H, W, 3) float, before lighting/noise
    surface: np.ndarray  # (H, W) where defects may appear (1 everywhere for textures)
    bg: np.ndarray | None = None  # what shows where object material goes missing
    info: dict = field(default_factory=dict)


def render_fabric(rng: np.random.Generator, size: int) -> Scene:
    """A 3/1 twill (denim-like): indigo warp floats over three ecru weft picks."""
    s = size / 256.0
    y, x = grid(size)
    period = size * rng.uniform(0.036, 0.041)
    ang = rng.normal(0.0, 0.03)
    wob = 0.15 * period
    u = x * np.cos(ang) + y * np.sin(ang) + rng.uniform(0, 8 * period)
    v = -x * np.sin(ang) + y * np.cos(ang) + rng.uniform(0, 8 * period)
    u = u + wob * noise(rng, size, 30 * s)
    v = v + wob * noise(rng, size, 30 * s)
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
    fib_warp = aniso_noise(rng, size, (3.0 * s + 0.5, 0.6))
    fib_weft = aniso_noise(rng, size, (0.6, 3.0 * s + 0.5))
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
    img = img * (1.0 + 0.04 * noise(rng, size, 50 * s))[..., None]
    img = ndimage.gaussian_filter(img, (0.5 * s + 0.2, 0.5 * s + 0.2, 0))
    return Scene(img=img, surface=np.ones((size, size)), info={"thread_angle": ang})


def render_wood(rng: np.random.Generator, size: int) -> Scene:
    """Wood grain: warped growth rings with latewood lines and pores, grain roughly vertical."""
    s = size / 256.0
    y, x = grid(size)
    ang = rng.normal(0.0, 0.05)  # grain runs roughly vertically
    u = x * np.cos(ang) + y * np.sin(ang)
    v = -x * np.sin(ang) + y * np.cos(ang)
    period = size * rng.uniform(0.05, 0.065)
    warp = period * (1.6 * noise(rng, size, 90 * s) + 0.05 * noise(rng, size, 20 * s))
    drift = (
        rng.uniform(0.5, 1.5)
        * period
        * np.sin(2 * np.pi * v / (size * rng.uniform(0.8, 1.6)) + rng.uniform(0, 2 * np.pi))
    )
    phase = (u + warp + drift) / period + rng.uniform(0.0, 1.0)
    f = phase - np.floor(phase)
    # Earlywood darkens gradually into a latewood line that ends abruptly.
    late = 0.35 * f**2 + 0.75 * np.exp(-(1.0 - f) / 0.07) + 0.4 * np.exp(-f / 0.03)
    late = np.clip(late * (1.0 + 0.25 * noise(rng, size, 25 * s)), 0.0, 1.2)
    pores = aniso_noise(rng, size, (7.0 * s + 1.0, 0.5))
    pores_fine = aniso_noise(rng, size, (2.0 * s + 0.5, 0.4))
    low = noise(rng, size, 40 * s)
    t = np.clip(0.45 * late + 0.07 * pores + 0.05 * pores_fine + 0.08 * low + 0.12, 0.0, 1.0)
    light = np.array([0.80, 0.60, 0.40]) * rng.uniform(0.96, 1.04, 3)
    dark = np.array([0.50, 0.31, 0.17]) * rng.uniform(0.95, 1.05, 3)
    img = light * (1 - t[..., None]) + dark * t[..., None]
    img = ndimage.gaussian_filter(img, (0.4 * s + 0.2, 0.4 * s + 0.2, 0))
    return Scene(img=img, surface=np.ones((size, size)), info={"grain_angle": ang})


def render_hex_nut(rng: np.random.Generator, size: int) -> Scene:
    """A zinc-plated hex nut seen from above on a dark mat, slightly shifted and rotated."""
    s = size / 256.0
    y, x = grid(size)
    # Background: dark slate-blue mat with a fine fabric-like grain.
    bg_col = np.array([0.15, 0.17, 0.20]) * rng.uniform(0.92, 1.08)
    bg_lum = 1.0 + 0.06 * noise(rng, size, 40 * s) + 0.05 * noise(rng, size, 0.8)
    cx = size / 2 + rng.normal(0.0, 0.02 * size)
    cy = size / 2 + rng.normal(0.0, 0.02 * size)
    rot = rng.normal(0.0, 0.12)
    apothem = 0.30 * size * rng.uniform(0.985, 1.015)
    corner = 0.03 * size

    def hex_sd(xx, yy):
        dx, dy = xx - cx, yy - cy
        px = dx * np.cos(rot) + dy * np.sin(rot)
        py = -dx * np.sin(rot) + dy * np.cos(rot)
        return hexagon_sd(px, py, apothem, corner)

    off = np.array([4.0, 5.0]) * s
    shadow = ndimage.gaussian_filter(fill(hex_sd(x - off[0], y - off[1])), 4.0 * s + 0.5)
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
    sheen = np.cos(2.0 * (phi - LIGHT_ANGLE - np.pi / 2)) ** 2
    face = 0.50 + 0.035 * marks + 0.16 * sheen
    # Chamfered corners (outside the face circle): a cone tilted outwards.
    tilt = 0.6
    d_out, _ = shade(np.cos(phi) * tilt, np.sin(phi) * tilt, np.sqrt(1 - tilt**2) + 0 * phi)
    chamfer = 0.18 + 0.55 * d_out
    # Countersink: a cone tilted inwards.
    d_in, _ = shade(-np.cos(phi) * tilt, -np.sin(phi) * tilt, np.sqrt(1 - tilt**2) + 0 * phi)
    sink = 0.12 + 0.60 * d_in
    # Thread inside the bore: rings, darker with depth.
    pitch = 0.035 * size
    depth = np.clip((rho - r_through) / (r_bore - r_through), 0.0, 1.0)
    thread = (0.10 + 0.30 * depth**1.5) * (0.65 + 0.35 * np.sin(2 * np.pi * rho / pitch + rot))
    thread = thread * (0.7 + 0.5 * d_in)

    lum = np.where(rho < r_bore, thread, np.where(rho < r_sink, sink, face))
    w_face = fill(rho - r_face, 1.5)
    lum = np.where(rho < r_sink, lum, w_face * face + (1 - w_face) * chamfer)
    metal = np.array([0.98, 0.97, 0.93]) * rng.uniform(0.985, 1.015, 3)
    obj_img = lum[..., None] * metal
    # Dark bevel along the outer rim.
    edge = np.clip(1.0 - np.abs(hex_sd(x, y) + 1.0 * s) / (1.2 * s + 0.3), 0.0, 1.0)
    obj_img = obj_img * (1.0 - 0.35 * edge)[..., None]
    obj = fill(hex_sd(x, y)) * (1.0 - fill(rho - r_through))
    img = obj[..., None] * obj_img + (1 - obj[..., None]) * bg
    surface = obj * (rho > r_sink + 1.0)
    return Scene(img=img, surface=surface, bg=bg, info={"obj": obj})


def render_capsule(rng: np.random.Generator, size: int) -> Scene:
    """A shiny red/ivory gelatin capsule on light paper, slightly shifted and rotated."""
    s = size / 256.0
    y, x = grid(size)
    bg_lum = rng.uniform(0.74, 0.82) * (
        1.0 + 0.02 * noise(rng, size, 50 * s) + 0.015 * noise(rng, size, 0.8)
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
        sd_cap = np.maximum(stadium_sd(a, b, -half, seam, rc), a - seam)
        sd_body = stadium_sd(a, b, seam - 0.3 * half, half, r)
        return a, b, sd_cap, sd_body

    off = np.array([3.0, 6.0]) * s
    _, _, sc, sb = parts(x - off[0], y - off[1])
    shadow = ndimage.gaussian_filter(fill(np.minimum(sc, sb)), 5.0 * s + 0.5)
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
    d_c, s_c = shade(*normals(-half, seam, rc), shininess=50.0)
    d_b, s_b = shade(*normals(seam - 0.3 * half, half, r), shininess=50.0)
    cap_img = cap_col * (0.30 + 0.75 * d_c)[..., None] + 0.55 * s_c[..., None]
    body_img = body_col * (0.28 + 0.72 * d_b)[..., None] + 0.45 * s_b[..., None]
    # The cap's lip casts a thin dark line on the body.
    lip = np.clip(1.0 - (a - seam) / (2.0 * s + 0.5), 0.0, 1.0) * (a >= seam)
    body_img = body_img * (1.0 - 0.35 * lip)[..., None]
    a_cap, a_body = fill(sd_cap), fill(sd_body)
    obj_img = a_cap[..., None] * cap_img + (1 - a_cap[..., None]) * body_img
    obj = 1.0 - (1.0 - a_cap) * (1.0 - a_body)
    img = obj[..., None] * obj_img + (1 - obj[..., None]) * bg
    return Scene(img=img, surface=obj, bg=bg, info={"obj": obj})
