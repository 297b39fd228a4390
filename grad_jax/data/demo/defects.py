"""Defect painters of the demo generator, and which defects each class gets.

A painter takes a clean :class:`~grad_jax.data.demo.objects.Scene` and its own generator and returns
``(image, coverage)``: the float ``(H, W, 3)`` image with the defect painted in, and an ``(H, W)``
coverage in [0, 1] saying how strongly each pixel was altered (pixels with coverage 0 are left
exactly unchanged; the build turns coverage into the ground-truth mask). ``CLASS_SPECS`` names,
per class, the scene renderer and its defect types with their painters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from grad_jax.data.demo.objects import (
    Scene,
    render_capsule,
    render_fabric,
    render_hex_nut,
    render_wood,
)
from grad_jax.data.demo.textures import (
    LIGHT_ANGLE,
    blob_sd,
    fill,
    grid,
    noise,
    polygon_sd,
    random_curve,
    random_polygon,
    shade,
    signed_distance,
    smoothstep,
    stroke,
)

Painter = Callable[[Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _pick_point(rng: np.random.Generator, scene: Scene, margin: float, erode: float = 0.0):
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
    """Mix ``target`` into the ``(H, W, 3)`` ``img`` with the ``(H, W)`` weight ``alpha``."""
    return img * (1.0 - alpha[..., None]) + target * alpha[..., None]


def _defect_scratch(scene: Scene, rng: np.random.Generator, *, style: str):
    """One to three thin, nearly parallel bright scratches."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    start = _pick_point(rng, scene, 0.2 * size, erode=4 * s)
    heading = rng.uniform(0, 2 * np.pi)
    length = size * rng.uniform(0.28, 0.45)
    base = random_curve(rng, start, heading, length, 2.0 * s + 0.5, 0.02, 6.0)
    base = base - (base[-1] - base[0]) / 2.0  # centre the stroke on the picked point
    cover = np.zeros((size, size))
    for k in range(int(rng.integers(1, 4))):
        shift = np.array([-np.sin(heading), np.cos(heading)]) * k * rng.uniform(4, 7) * s
        n = len(base)
        lo, hi = int(rng.uniform(0, 0.25) * n), int(rng.uniform(0.75, 1.0) * n)
        pts = base[lo : max(hi, lo + 3)] + shift
        hw = rng.uniform(1.0, 1.5) * s + 0.3 if k == 0 else rng.uniform(0.7, 1.1) * s + 0.3
        c, _, _, _ = stroke(pts, size, hw, taper=0.2)
        cover = np.maximum(cover, c)
    alpha, cover = _on_surface(cover, scene.surface)
    # Wood: the pale fibres under the finish; metal: a bright specular groove.
    colour = [0.93, 0.82, 0.64] if style == "wood" else [0.97, 0.97, 0.95]
    target = np.broadcast_to(np.array(colour), img.shape)
    return _blend(img, target, 0.9 * alpha), cover


def _crack_cover(rng, size, start, heading, scale, hw0):
    """``(size, size)`` coverage of a jagged crack of length ``scale`` with 1-3 branches."""
    s = size / 256.0
    main = random_curve(rng, start, heading, scale, 2.0 * s + 0.6, 0.05, 3.0, zigzag=0.25)
    main = main - (main[-1] - main[0]) / 2.0
    cover, _, _, _ = stroke(main, size, hw0, taper=0.35)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(len(main) // 5, 4 * len(main) // 5))
        d = main[min(k + 1, len(main) - 1)] - main[k]
        h = np.arctan2(d[0], d[1]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
        br = random_curve(
            rng, main[k], h, scale * rng.uniform(0.2, 0.45), 2.0 * s + 0.6, 0.05, 3.0, 0.25
        )
        c, _, _, _ = stroke(br, size, hw0 * rng.uniform(0.55, 0.8), taper=0.5)
        cover = np.maximum(cover, c)
    return cover


def _defect_crack(scene: Scene, rng: np.random.Generator, *, along_grain: bool):
    """A dark branching crack, along the wood grain or in any direction."""
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


def _defect_hole(scene: Scene, rng: np.random.Generator, *, style: str):
    """A dark round pit with a raised, lit rim (wood) or a torn hole in a fabric."""
    centre = _pick_point(rng, scene, 0.12 * scene.img.shape[0])
    if style == "fabric":
        return _torn_hole(scene, rng, centre)
    return _lit_pit(scene, rng, centre)


def _towards_light(size: int, c: np.ndarray) -> np.ndarray:
    """``(size, size)`` cosine between the direction from ``c`` to each pixel and the light's."""
    y, x = grid(size)
    theta = np.arctan2(y - c[0], x - c[1])
    return np.cos(theta - LIGHT_ANGLE)


def _torn_hole(scene: Scene, rng: np.random.Generator, c: np.ndarray):
    """A ragged hole around ``c`` showing the dark backing, with broken yarn ends and a fluffy
    frayed rim."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    y, x = grid(size)
    towards_light = _towards_light(size, c)
    radius = size * rng.uniform(0.04, 0.065)
    sd = blob_sd(y, x, c[0], c[1], radius, rng, 0.3)
    sd = signed_distance(sd + (1.2 * s + 0.3) * noise(rng, size, 0.8) < 0)  # ragged, torn outline
    hole = fill(sd)
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
        pts = random_curve(rng, p0, d, radius * rng.uniform(0.3, 0.7), 1.0 * s + 0.5, 0.05, 2.0)
        cov, _, _, _ = stroke(pts, size, rng.uniform(0.8, 1.3) * s + 0.3, taper=0.4)
        ends = np.maximum(ends, cov)
    yarn = np.array([0.62, 0.62, 0.60]) * rng.uniform(0.85, 1.1)
    out = _blend(out, np.broadcast_to(yarn, img.shape), 0.9 * ends)
    # Frayed, fluffed-up rim around the tear.
    rim_w = 2.5 * s + 1.0
    rim = fill(sd - rim_w) * (1 - hole)
    fluff = np.clip(0.6 + 0.4 * noise(rng, size, 0.7), 0.0, 1.0)
    out = _blend(out, np.broadcast_to(np.array([0.78, 0.78, 0.76]), img.shape), 0.7 * rim * fluff)
    return out, np.maximum(np.maximum(hole, rim), ends)


def _lit_pit(scene: Scene, rng: np.random.Generator, c: np.ndarray):
    """A dark round pit around ``c`` with a raised rim lit from the upper left."""
    img = scene.img
    size = img.shape[0]
    y, x = grid(size)
    towards_light = _towards_light(size, c)
    radius = size * rng.uniform(0.028, 0.045)
    sd = blob_sd(y, x, c[0], c[1], radius, rng, 0.12, harmonics=4)
    rim_w = 0.5 * radius + 1.0
    pit = fill(sd)
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
    """Coverage and darkening profile (both ``(size, size)``) of an irregular blotch, with a
    soft edge or a dried ring edge."""
    s = size / 256.0
    y, x = grid(size)
    c = _pick_point(rng, scene, 0.15 * size)
    radius = size * rng.uniform(*radius_range)
    rho2 = ((y - c[0]) ** 2 + (x - c[1]) ** 2) / radius**2
    field_ = 1.0 - rho2 + 0.45 * noise(rng, size, 0.35 * radius)
    inside = field_ > 0
    lab, _ = ndimage.label(inside)
    centre_lab = lab[int(np.clip(c[0], 0, size - 1)), int(np.clip(c[1], 0, size - 1))]
    if centre_lab > 0:
        inside = lab == centre_lab
    sd = signed_distance(inside)
    if soft:
        fade = min(0.2 * radius, 4.0 * s + 1.0)
        cover = smoothstep(-0.5, fade, -sd)
        profile = cover
    else:
        cover = fill(sd)
        ring_w = 2.5 * s + 0.8
        profile = cover * (0.55 + 0.45 * np.exp(np.minimum(sd, 0.0) / ring_w))
    return cover, profile


def _defect_stain(scene: Scene, rng: np.random.Generator):
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


def _defect_rust(scene: Scene, rng: np.random.Generator):
    """An orange-brown granular rust patch on the object's surface."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    cover, _ = _stain_cover(rng, scene, size, (0.05, 0.10), soft=True)
    alpha, cover = _on_surface(cover, scene.surface)
    grain = noise(rng, size, 1.0 * s + 0.4)
    spots = noise(rng, size, 3.0 * s + 0.5)
    lum = img.mean(axis=2, keepdims=True)
    col = np.array([0.62, 0.30, 0.12]) * rng.uniform(0.9, 1.1)
    target = col * (0.5 + 0.6 * lum + 0.10 * grain[..., None] + 0.08 * spots[..., None])
    return _blend(img, target, 0.9 * alpha), cover


def _defect_thread(scene: Scene, rng: np.random.Generator):
    """A stray fibre lying on the fabric (extra material)."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    start = _pick_point(rng, scene, 0.25 * size)
    length = size * rng.uniform(0.30, 0.55)
    pts = random_curve(rng, start, rng.uniform(0, 2 * np.pi), length, 1.5 * s + 0.5, 0.06, 5.0)
    pts = pts - (pts[-1] - pts[0]) / 2.0
    hw = rng.uniform(1.1, 1.6) * s + 0.3
    cover, dist, hwmap, frac = stroke(pts, size, hw, taper=0.05)
    cols = np.array([[0.08, 0.08, 0.09], [0.70, 0.10, 0.10], [0.95, 0.93, 0.85]])
    col = cols[rng.integers(len(cols))]
    twist = 0.8 + 0.2 * np.sin(frac * length / (2.5 * s + 0.5) * 2 * np.pi)
    roundness = np.sqrt(np.clip(1.0 - (dist / np.maximum(hwmap, 0.5)) ** 2, 0.0, 1.0))
    target = col * (0.55 + 0.45 * roundness * twist)[..., None] + 0.05
    return _blend(img, target, cover), cover


def _defect_missing(scene: Scene, rng: np.random.Generator):
    """A chunk broken off the object's outline: background shows where material was."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    y, x = grid(size)
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
        sd = polygon_sd(y, x, random_polygon(rng, c, radius))
        cut = fill(sd)
        removed = cut * obj
        if removed.sum() >= 0.8 * radius**2:
            break
    out = _blend(img, scene.bg, removed)
    # Fracture face: a thin rough band along the new edge.
    band = np.clip(1.0 - np.abs(sd - 1.0 * s) / (1.5 * s + 0.5), 0.0, 1.0) * (sd > 0)
    band = band * (obj >= 0.99)
    rough = 0.7 + 0.3 * np.clip(noise(rng, size, 0.8), -1, 1)
    out = out * (1.0 - 0.55 * band * rough)[..., None]
    # The mask is where material was removed, including partly covered outline pixels.
    return out, np.maximum(np.maximum(removed, band), cut * (obj >= 0.1))


def _defect_contamination(scene: Scene, rng: np.random.Generator):
    """A lump of foreign material stuck on the object."""
    img = scene.img
    size = img.shape[0]
    s = size / 256.0
    y, x = grid(size)
    c = _pick_point(rng, scene, 0.1 * size, erode=6 * s)
    radius = size * rng.uniform(0.03, 0.055)
    sd = blob_sd(y, x, c[0], c[1], radius, rng, 0.35)
    cover = fill(sd)
    height = np.sqrt(np.clip(-sd / radius, 0.0, 1.0)) * radius * 0.6
    gy, gx = np.gradient(ndimage.gaussian_filter(height, 1.0))
    n = np.sqrt(gx**2 + gy**2 + 1.0)
    diffuse, spec = shade(-gx / n, -gy / n, 1.0 / n, shininess=20.0)
    cols = np.array([[0.30, 0.22, 0.14], [0.22, 0.22, 0.24], [0.45, 0.40, 0.20]])
    col = cols[rng.integers(len(cols))]
    grain = 1.0 + 0.15 * noise(rng, size, 0.8)
    target = col * ((0.35 + 0.8 * diffuse) * grain)[..., None] + 0.15 * spec[..., None]
    return _blend(img, target, cover), cover


# --------------------------------------------------------------------------------------
# The classes: each one's scene renderer and the defects it gets.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSpec:
    """One demo class: ``kind`` is "texture" or "object"; ``defects`` maps each defect type to
    its one-line description (written into the dataset's README) and its painter."""

    name: str
    kind: str
    description: str
    render: Callable[[np.random.Generator, int], Scene]
    defects: dict[str, tuple[str, Painter]]


CLASS_SPECS: dict[str, ClassSpec] = {
    spec.name: spec
    for spec in [
        ClassSpec(
            "fabric",
            "texture",
            "3/1 twill, denim-like: indigo warp floats over ecru weft, yarn irregularity",
            render_fabric,
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
        ClassSpec(
            "wood",
            "texture",
            "wood grain: warped growth rings, latewood lines and pores, grain roughly vertical",
            render_wood,
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
        ClassSpec(
            "hex_nut",
            "object",
            "a zinc-plated hex nut seen from above on a dark mat, small shifts and rotations",
            render_hex_nut,
            {
                "scratch": (
                    "thin bright scratches across the face",
                    lambda sc, r: _defect_scratch(sc, r, style="metal"),
                ),
                "missing": ("a chunk broken off the outline, background showing", _defect_missing),
                "rust": ("an orange-brown granular rust patch on the face", _defect_rust),
            },
        ),
        ClassSpec(
            "capsule",
            "object",
            "a shiny red/ivory gelatin capsule on light paper, small shifts and rotations",
            render_capsule,
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

DEMO_CLASSES: tuple[str, ...] = tuple(CLASS_SPECS)
DEMO_DEFECTS: dict[str, tuple[str, ...]] = {n: tuple(sp.defects) for n, sp in CLASS_SPECS.items()}
