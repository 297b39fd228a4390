"""Synthetic defects with exact masks, made from normal images only (for label-free selection).

Eight kinds, each pasted into one normal image at a random place. Four are easy, with a change of
at least 12 grey levels on average:
- `cutpaste`: a blob-shaped patch cut from another normal image, moved, flipped or rotated, and
  jittered in brightness and contrast;
- `noise_blob`: a blob filled with a noise texture around a shifted mean intensity;
- `scratch`: a thin curved line, darker or brighter than the surface;
- `hole`: a blob whose brightness is scaled down (a pit) or up (a glare).

Four are hard: their contrast follows the image's own texture, measured as its local standard
deviation (`local_std`: of the grey values, the channel mean, in the mask's bounding box
widened by `texture_margin` on each side), and they need change only `_MIN_TEXTURE_CHANGE`
local stds (at least `_MIN_LEVELS` grey levels, for flat images) to count as visible:
- `faint_blob`: a small blob (radius 2-6% of the shorter side) shifted by 1.5-3 local stds;
- `faint_scratch`: a 1 px line (at 256 px; `round(side / 256)` px wider images) shifted by
  2-4 local stds;
- `shifted_patch`: the content of another normal image at the same place after a shift of
  5-20% of the shorter side, pasted as it is: it blends photometrically (same part, same
  lighting) but is structurally wrong (misaligned);
- `matched_patch`: a patch of another normal image pasted, as it is, at the one of 12 drawn
  places whose surroundings (the widened box around it, without the blob) match its mean grey
  value best.

Everything is host numpy and Pillow, driven by a `numpy.random.Generator` passed in. The mask is
exactly the set of pixels that were replaced (1) and nothing else (0). A kind that would change
too little redraws (up to `tries` times), and a defect still too faint after that is lifted by
one constant brightness shift until it is not, so every defect is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = (
    "cutpaste",
    "noise_blob",
    "scratch",
    "hole",
    "faint_blob",
    "faint_scratch",
    "shifted_patch",
    "matched_patch",
)
#: The kinds whose contrast and visibility are measured against the local texture.
TEXTURE_KINDS: tuple[str, ...] = KINDS[4:]

# Defect size as a fraction of the image's shorter side (blob radius; scratch length x4).
_MIN_RADIUS, _MAX_RADIUS = 0.04, 0.14
_SMALL_RADIUS = (0.02, 0.06)  # faint blobs
_MIN_CHANGE = 12.0  # mean absolute intensity change (0..255) an easy defect must make
_MIN_TEXTURE_CHANGE = 0.75  # ... a texture-relative one, in local stds
_MIN_LEVELS = 3.0  # ... and at least this many grey levels (a flat image has std 0)
_SHIFT = (0.05, 0.2)  # shifted_patch: shift as a fraction of the shorter side
_PLACES = 12  # matched_patch: places drawn to find the best-matching surroundings


def smooth_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """`[H, W]` float32 noise in [0, 1]: a `cells x cells` random grid, bicubically upsampled."""
    h, w = shape
    grid = rng.random((cells, cells)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    out = np.asarray(image, np.float32)
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def blob_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    radius: tuple[float, float] = (_MIN_RADIUS, _MAX_RADIUS),
) -> np.ndarray:
    """`[H, W]` bool: an irregular blob (an ellipse whose edge is moved by smooth noise), its
    radius drawn in `radius` (fractions of the shorter side)."""
    h, w = shape
    side = min(h, w)
    r = rng.uniform(*radius) * side
    ry = r * rng.uniform(0.5, 1.5)
    rx = r * rng.uniform(0.5, 1.5)
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
        mask[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    return mask


def scratch_mask(
    shape: tuple[int, int], rng: np.random.Generator, width: int | None = None
) -> np.ndarray:
    """`[H, W]` bool: a thin curved line (a quadratic Bezier), `width` px wide (None: 1-3 px
    at 256 px, drawn)."""
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
    if width is None:
        width = max(1, int(round(rng.uniform(1, 3) * side / 256)))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=width)
    return np.asarray(canvas) > 0


def texture_margin(shape: tuple[int, int]) -> int:
    """How far (px) around a defect its texture is measured: 6% of the shorter side, >= 3."""
    return max(3, int(round(0.06 * min(shape))))


def _box(shape, ys: np.ndarray, xs: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of (ys, xs) widened by `texture_margin`, clipped to the image."""
    h, w = shape[:2]
    m = texture_margin((h, w))
    return (
        slice(max(int(ys.min()) - m, 0), min(int(ys.max()) + m + 1, h)),
        slice(max(int(xs.min()) - m, 0), min(int(xs.max()) + m + 1, w)),
    )


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32).mean(axis=-1)


def local_std(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """The standard deviation of `image`'s grey values (channel mean) in the bounding box of
    the pixels (ys, xs) widened by `texture_margin` on each side."""
    rows, cols = _box(image.shape, ys, xs)
    return float(_grey(image)[rows, cols].std())


def _surroundings_mean(grey: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """Mean grey value of the widened box around (ys, xs) without those pixels."""
    rows, cols = _box(grey.shape, ys, xs)
    inside = np.zeros(grey.shape, bool)
    inside[ys, xs] = True
    ring = ~inside[rows, cols]
    part = grey[rows, cols]
    return float(part[ring].mean()) if ring.any() else float(part.mean())


def required_change(kind: str, image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """The mean absolute change (grey levels, over the mask's pixels and channels) a defect of
    `kind` at (ys, xs) must make: 12 for the easy kinds; `_MIN_TEXTURE_CHANGE` local stds, at
    least `_MIN_LEVELS`, for the texture kinds."""
    if kind not in TEXTURE_KINDS:
        return _MIN_CHANGE
    return max(_MIN_TEXTURE_CHANGE * local_std(image, ys, xs), _MIN_LEVELS)


def _as_donor(donor: np.ndarray, h: int, w: int) -> np.ndarray:
    if donor.shape[:2] != (h, w):
        donor = np.asarray(Image.fromarray(donor).resize((w, h), Image.BILINEAR))
    return donor.astype(np.float32)


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _cutpaste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    donor = _as_donor(donor, h, w)
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
    return (ys, xs), values


def _noise_blob(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    mask = blob_mask((h, w), rng)
    ys, xs = np.nonzero(mask)
    base = image[ys, xs].astype(np.float32).mean(axis=0, keepdims=True)
    sign = _sign(rng)
    texture = smooth_noise((h, w), int(rng.integers(8, 32)), rng)[ys, xs][:, None]
    fine = rng.normal(0, 1, (len(ys), 1)).astype(np.float32)
    values = base + sign * rng.uniform(25, 70) + (texture - 0.5) * rng.uniform(40, 100) + 8 * fine
    return (ys, xs), values


def _scratch(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    ys, xs = np.nonzero(scratch_mask((h, w), rng))
    sign = _sign(rng)
    values = image[ys, xs].astype(np.float32) + sign * rng.uniform(50, 110)
    return (ys, xs), values


def _hole(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    ys, xs = np.nonzero(blob_mask((h, w), rng))
    gain = rng.uniform(0.2, 0.6) if rng.random() < 0.6 else rng.uniform(1.5, 2.2)
    values = image[ys, xs].astype(np.float32) * gain + (0 if gain < 1 else 20)
    return (ys, xs), values


def _texture_shift(image, ys, xs, low: float, high: float, rng: np.random.Generator):
    """The pixels (ys, xs) shifted by `low`-`high` local stds (at least `_MIN_LEVELS` a std)."""
    std = max(local_std(image, ys, xs), _MIN_LEVELS)
    return image[ys, xs].astype(np.float32) + _sign(rng) * rng.uniform(low, high) * std


def _faint_blob(image: np.ndarray, rng: np.random.Generator):
    ys, xs = np.nonzero(blob_mask(image.shape[:2], rng, _SMALL_RADIUS))
    return (ys, xs), _texture_shift(image, ys, xs, 1.5, 3.0, rng)


def _faint_scratch(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    width = max(1, int(round(min(h, w) / 256)))
    ys, xs = np.nonzero(scratch_mask((h, w), rng, width))
    return (ys, xs), _texture_shift(image, ys, xs, 2.0, 4.0, rng)


def _shifted_patch(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    donor = _as_donor(donor, h, w)
    ys, xs = np.nonzero(blob_mask((h, w), rng))
    size = rng.uniform(*_SHIFT) * min(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    want = np.array([np.sin(angle), np.cos(angle)]) * size
    lo = np.array([-ys.min(), -xs.min()])
    hi = np.array([h - 1 - ys.max(), w - 1 - xs.max()])
    # The drawn shift, else its opposite, else the drawn one clipped into the image.
    for shift in (want, -want):
        s = np.round(shift).astype(int)
        if np.all(s >= lo) and np.all(s <= hi):
            break
    else:
        s = np.clip(np.round(want).astype(int), lo, hi)
    return (ys, xs), donor[ys + s[0], xs + s[1]]


def _matched_patch(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    donor = _as_donor(donor, h, w)
    if rng.random() < 0.5:
        donor = donor[:, ::-1]
    ys, xs = np.nonzero(blob_mask((h, w), rng))
    values = donor[ys, xs]
    target = float(values.mean())
    grey = _grey(image)
    best = None
    for _ in range(_PLACES):
        ty = int(rng.integers(-ys.min(), h - ys.max()))
        tx = int(rng.integers(-xs.min(), w - xs.max()))
        gap = abs(_surroundings_mean(grey, ys + ty, xs + tx) - target)
        if best is None or gap < best[0]:
            best = (gap, ty, tx)
    _, ty, tx = best
    return (ys + ty, xs + tx), values


def _lift(values: np.ndarray, original: np.ndarray, need: float) -> np.ndarray:
    """`values` shifted by the smallest whole number of grey levels (away from the nearer end
    of 0..255) that makes their mean absolute change from `original` reach `need`."""
    sign = 1.0 if values.mean() < 127.5 else -1.0
    for step in range(1, 256):
        lifted = np.clip(values + sign * step, 0, 255)
        if np.abs(lifted - original).mean() >= need:
            return lifted
    return lifted


def make_defect(
    image: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator, tries: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect of `kind` in a normal image.

    Args:
      image: `[H, W, 3]` uint8 normal image.
      donor: `[h, w, 3]` uint8 another normal image (the source of the patch kinds' patches;
        resized to `image`'s size).
      kind: one of `KINDS`.
      rng: the only source of randomness.

    Returns:
      (`[H, W, 3]` uint8 defective image, `[H, W]` uint8 mask in {0, 1}); the mask marks
      exactly the replaced pixels, and they change on average by at least
      `required_change(kind, image, ...)` grey levels.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; one of {', '.join(KINDS)}")
    original = image.astype(np.float32)
    make = {
        "cutpaste": lambda: _cutpaste(image, donor, rng),
        "noise_blob": lambda: _noise_blob(image, rng),
        "scratch": lambda: _scratch(image, rng),
        "hole": lambda: _hole(image, rng),
        "faint_blob": lambda: _faint_blob(image, rng),
        "faint_scratch": lambda: _faint_scratch(image, rng),
        "shifted_patch": lambda: _shifted_patch(image, donor, rng),
        "matched_patch": lambda: _matched_patch(image, donor, rng),
    }[kind]
    for _ in range(tries):
        (ys, xs), values = make()
        values = np.clip(np.round(values), 0, 255)
        need = required_change(kind, image, ys, xs)
        if np.abs(values - original[ys, xs]).mean() >= need:
            break
    else:  # still too faint (e.g. a donor as flat as the image): one brightness shift
        values = _lift(values, original[ys, xs], need)
    out = image.copy()
    out[ys, xs] = values.astype(np.uint8)
    changed = np.zeros(image.shape[:2], np.uint8)
    changed[ys, xs] = 1
    return out, changed


def make_defects(
    images: Sequence[np.ndarray],
    donors: Sequence[np.ndarray],
    per_image: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """`per_image` defects in each image, `kinds` in turn, donors drawn from `donors`.

    Returns (index into `images`, kind, defective image, mask) tuples; deterministic for a seed.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"defect kinds {list(kinds)!r}: one or more of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, 4711])
    out = []
    turn = 0
    for i, image in enumerate(images):
        for _ in range(per_image):
            kind = kinds[turn % len(kinds)]
            turn += 1
            donor = donors[int(rng.integers(len(donors)))] if len(donors) else image
            defective, mask = make_defect(image, donor, kind, rng)
            out.append((i, kind, defective, mask))
    return out
