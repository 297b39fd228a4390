"""Synthetic defects with exact masks, made from normal images only (for label-free selection).

Four kinds, each pasted into one normal image at a random place:
- `cutpaste`: a blob-shaped patch cut from another normal image, moved, flipped or rotated, and
  jittered in brightness and contrast;
- `noise_blob`: a blob filled with a noise texture around a shifted mean intensity;
- `scratch`: a thin curved line, darker or brighter than the surface;
- `hole`: a blob whose brightness is scaled down (a pit) or up (a glare).

Everything is host numpy and Pillow, driven by a `numpy.random.Generator` passed in. The mask is
exactly the set of pixels that were replaced (1) and nothing else (0); a kind that would change
too few pixels redraws, so every defect is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = ("cutpaste", "noise_blob", "scratch", "hole")

# Defect size as a fraction of the image's shorter side (blob radius; scratch length x4).
_MIN_RADIUS, _MAX_RADIUS = 0.04, 0.14
_MIN_CHANGE = 12.0  # mean absolute intensity change (0..255) a defect must make in its mask


def smooth_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """`[H, W]` float32 noise in [0, 1]: a `cells x cells` random grid, bicubically upsampled."""
    h, w = shape
    grid = rng.random((cells, cells)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    out = np.asarray(image, np.float32)
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def blob_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """`[H, W]` bool: an irregular blob (an ellipse whose edge is moved by smooth noise)."""
    h, w = shape
    side = min(h, w)
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * side
    ry = radius * rng.uniform(0.5, 1.5)
    rx = radius * rng.uniform(0.5, 1.5)
    cy = rng.uniform(ry, h - ry) if h > 2 * ry else h / 2
    cx = rng.uniform(rx, w - rx) if w > 2 * rx else w / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    edge = 0.75 + 0.5 * smooth_noise(shape, 6, rng)
    mask = u * u + v * v <= edge * edge
    if not mask.any():
        mask[int(cy), int(cx)] = True
    return mask


def scratch_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """`[H, W]` bool: a thin curved line (a quadratic Bezier, 1-3 px wide at 256 px)."""
    h, w = shape
    side = min(h, w)
    length = rng.uniform(4 * _MIN_RADIUS, 4 * _MAX_RADIUS) * side
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
    half = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    p0, p2 = np.array([cx, cy]) - half, np.array([cx, cy]) + half
    bend = np.array([-half[1], half[0]]) * rng.uniform(-0.6, 0.6)
    p1 = np.array([cx, cy]) + bend
    t = np.linspace(0, 1, 64)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(1, int(round(rng.uniform(1, 3) * side / 256)))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=width)
    return np.asarray(canvas) > 0


def _cutpaste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    if donor.shape[:2] != (h, w):
        donor = np.asarray(Image.fromarray(donor).resize((w, h), Image.BILINEAR))
    donor = donor.astype(np.float32)
    if rng.random() < 0.5:
        donor = donor[:, ::-1]
    if rng.random() < 0.5:
        donor = donor[::-1]
    mask = blob_mask((h, w), rng)
    ys, xs = np.nonzero(mask)
    # The patch comes from another place of the donor (a shifted copy of the mask).
    sy = rng.integers(-ys.min(), h - ys.max())
    sx = rng.integers(-xs.min(), w - xs.max())
    patch = donor[ys + sy, xs + sx]
    contrast = rng.uniform(0.6, 1.5)
    shift = rng.uniform(-40, 40)
    mean = patch.mean(axis=0, keepdims=True)
    values = (patch - mean) * contrast + mean + shift
    return mask, (ys, xs), values


def _noise_blob(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    mask = blob_mask((h, w), rng)
    ys, xs = np.nonzero(mask)
    base = image[ys, xs].astype(np.float32).mean(axis=0, keepdims=True)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    texture = smooth_noise((h, w), int(rng.integers(8, 32)), rng)[ys, xs][:, None]
    fine = rng.normal(0, 1, (len(ys), 1)).astype(np.float32)
    values = base + sign * rng.uniform(25, 70) + (texture - 0.5) * rng.uniform(40, 100) + 8 * fine
    return mask, (ys, xs), values


def _scratch(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    mask = scratch_mask((h, w), rng)
    ys, xs = np.nonzero(mask)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    values = image[ys, xs].astype(np.float32) + sign * rng.uniform(50, 110)
    return mask, (ys, xs), values


def _hole(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    mask = blob_mask((h, w), rng)
    ys, xs = np.nonzero(mask)
    gain = rng.uniform(0.2, 0.6) if rng.random() < 0.6 else rng.uniform(1.5, 2.2)
    values = image[ys, xs].astype(np.float32) * gain + (0 if gain < 1 else 20)
    return mask, (ys, xs), values


def make_defect(
    image: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator, tries: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect of `kind` in a normal image.

    Args:
      image: `[H, W, 3]` uint8 normal image.
      donor: `[h, w, 3]` uint8 another normal image (the source of `cutpaste` patches; resized
        to `image`'s size).
      kind: one of `KINDS`.
      rng: the only source of randomness.

    Returns:
      (`[H, W, 3]` uint8 defective image, `[H, W]` uint8 mask in {0, 1}); the mask marks
      exactly the replaced pixels, and they change by at least `_MIN_CHANGE` on average.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; one of {', '.join(KINDS)}")
    original = image.astype(np.float32)
    for _ in range(tries):
        if kind == "cutpaste":
            mask, (ys, xs), values = _cutpaste(image, donor, rng)
        elif kind == "noise_blob":
            mask, (ys, xs), values = _noise_blob(image, rng)
        elif kind == "scratch":
            mask, (ys, xs), values = _scratch(image, rng)
        else:
            mask, (ys, xs), values = _hole(image, rng)
        values = np.clip(np.round(values), 0, 255)
        if np.abs(values - original[ys, xs]).mean() >= _MIN_CHANGE:
            break
    out = image.copy()
    out[ys, xs] = values.astype(np.uint8)
    changed = np.zeros(mask.shape, np.uint8)
    changed[ys, xs] = 1
    return out, changed


def make_defects(
    images: Sequence[np.ndarray],
    donors: Sequence[np.ndarray],
    per_image: int,
    seed: int,
) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """`per_image` defects in each image, kinds in turn, donors drawn from `donors`.

    Returns (index into `images`, kind, defective image, mask) tuples; deterministic for a seed.
    """
    rng = np.random.default_rng([seed, 4711])
    out = []
    turn = 0
    for i, image in enumerate(images):
        for _ in range(per_image):
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            donor = donors[int(rng.integers(len(donors)))] if len(donors) else image
            defective, mask = make_defect(image, donor, kind, rng)
            out.append((i, kind, defective, mask))
    return out
