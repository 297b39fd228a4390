"""Synthetic defects (`data.synthetic_defects`): kinds in turn, seeded, each one visible, the
mask exactly the replaced pixels, cut-paste patches from the donor, holes that scale the
brightness; and the hard kinds: faint blobs and 1 px scratches whose contrast is a multiple of
the image's local texture std (measured here by the documented rule), another image's content
shifted or pasted where its mean matches the surroundings, each visible relative to the
texture. (`selection_test.py` checks the exact mask of every kind on a textured image.)"""

import numpy as np
import pytest

from grad_jax.data import synthetic_defects as sd


def _textured(shape=(48, 64), seed=0, lo=90, span=80):
    base = (sd.smooth_noise(shape, 5, np.random.default_rng(seed)) * span + lo).astype(np.uint8)
    return np.repeat(base[..., None], 3, axis=-1)


EASY = ("cutpaste", "noise_blob", "scratch", "hole")  # the first four, >= 12 grey levels
HARD = ("faint_blob", "faint_scratch", "shifted_patch", "matched_patch")


def test_kinds_come_in_turn_across_images_and_the_draw_is_seeded():
    assert sd.KINDS == EASY + HARD
    images = [_textured(seed=s) for s in range(5)]
    donors = [_textured(seed=10), _textured(seed=11)]
    out = sd.make_defects(images, donors, 2, seed=5)
    assert [(i, kind) for i, kind, _, _ in out] == [
        (0, "cutpaste"), (0, "noise_blob"), (1, "scratch"), (1, "hole"),
        (2, "faint_blob"), (2, "faint_scratch"), (3, "shifted_patch"), (3, "matched_patch"),
        (4, "cutpaste"), (4, "noise_blob"),
    ]  # fmt: skip
    chosen = sd.make_defects(images[:2], donors, 2, seed=5, kinds=("matched_patch", "hole"))
    assert [kind for _, kind, _, _ in chosen] == ["matched_patch", "hole"] * 2
    with pytest.raises(ValueError, match="defect kinds"):
        sd.make_defects(images, donors, 1, seed=5, kinds=("hole", "dent"))
    for i, _, image, mask in out:
        changed = np.any(image != images[i], axis=-1)
        assert not np.any(changed & (mask == 0))  # each defect is made in its own image
        assert mask.any()
    again = sd.make_defects(images, donors, 2, seed=5)
    other = sd.make_defects(images, donors, 2, seed=6)
    for a, b, c in zip(out, again, other, strict=True):
        assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
        assert not np.array_equal(a[3], c[3])  # another seed, other places
    assert sd.make_defects(images, donors, 0, seed=5) == []


def test_a_cutpaste_patch_comes_from_the_donor():
    """A flat donor (30 grey) pasted with brightness shift s in [-40, 40] and any contrast: the
    patch is flat at 30 + s, whatever texture the image had there."""
    image = _textured((48, 64), seed=1)
    donor = np.full((70, 50, 3), 30, np.uint8)  # another size: resized to the image's
    for seed in range(6):
        out, mask = sd.make_defect(image, donor, "cutpaste", np.random.default_rng(seed))
        inside = out[mask == 1].astype(int)
        assert len(np.unique(inside)) == 1, "the patch has the image's texture, not the donor's"
        assert 0 <= inside[0, 0] <= 70
        assert np.array_equal(out[mask == 0], image[mask == 0])


def test_a_hole_scales_the_brightness_of_its_pixels():
    """Inside a hole every pixel is g x its old value (a pit, g < 1), or g x it + 20 (a glare,
    g > 1), with one g for the whole hole, up to rounding and clipping at 255."""
    image = _textured((48, 64), seed=2, lo=60, span=100)
    kinds = set()
    for seed in range(12):
        out, mask = sd.make_defect(image, image, "hole", np.random.default_rng(seed))
        before = image[mask == 1].astype(float)
        after = out[mask == 1].astype(float)
        glare = after.mean() > before.mean()
        kinds.add(glare)
        offset = 20.0 if glare else 0.0
        keep = after < 255
        gains = (after[keep] - offset) / before[keep]
        assert np.ptp(gains) <= 2 * 0.5 / before[keep].min(), "not one gain for the hole"
        gain = float(np.median(gains))
        assert (1.5 <= gain <= 2.2) if glare else (0.2 <= gain <= 0.6)
    assert kinds == {False, True}  # both pits and glares are drawn


@pytest.mark.parametrize("kind", EASY)
def test_every_defect_is_visible_even_on_a_dark_flat_image(kind):
    """A pit in an image at grey 6 would change it by at most 5: the defect is drawn again until
    its pixels change by at least 12 on average."""
    image = np.full((40, 40, 3), 6, np.uint8)
    donor = np.full((40, 40, 3), 9, np.uint8)
    for seed in range(6):
        out, mask = sd.make_defect(image, donor, kind, np.random.default_rng(seed))
        change = np.abs(out.astype(float) - image)[mask == 1].mean()
        assert change >= 12.0, (kind, seed, change)
        assert np.array_equal(out[mask == 0], image[mask == 0])


def test_a_scratch_is_a_thin_line():
    """1-3 px wide at 256 px: its area is at most 3 px x its length (at most 0.56 of the side)
    plus the rounded ends, far below a blob's."""
    rng = np.random.default_rng(3)
    for _ in range(10):
        mask = sd.scratch_mask((256, 256), rng)
        assert 0 < mask.sum() <= 3 * (0.56 * 256 * 1.3) + 20


def test_an_unknown_kind_is_refused():
    image = _textured()
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        sd.make_defect(image, image, "dent", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# The hard kinds
# ---------------------------------------------------------------------------------------------


def texture_std(image: np.ndarray, mask: np.ndarray) -> float:
    """The documented local texture std: of the grey values (channel mean) in the mask's
    bounding box widened by 6% of the shorter side (at least 3 px) on each side."""
    margin = max(3, round(0.06 * min(mask.shape)))
    ys, xs = np.nonzero(mask)
    grey = image.astype(float).mean(axis=-1)
    top, left = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
    return float(grey[top : ys.max() + margin + 1, left : xs.max() + margin + 1].std())


def _shift_inside(image, out, mask) -> float:
    """The one brightness shift of every channel of every mask pixel (asserted constant, up to
    the rounding of the values)."""
    diff = out[mask == 1].astype(float) - image[mask == 1]
    assert np.ptp(diff) <= 1.0, "not one shift for the whole defect"
    return float(diff.mean())


@pytest.mark.parametrize("kind, low, high", [("faint_blob", 1.5, 3.0), ("faint_scratch", 2, 4)])
def test_a_faint_defect_shifts_its_pixels_by_a_few_local_stds(kind, low, high):
    """Mid-grey texture (no clipping): one shift for the whole defect, of `low`-`high` times
    the local std (at least 3 grey levels a std), so at least 0.75 std and 3 levels."""
    image = _textured((96, 128), seed=4, lo=100, span=60)
    signs = set()
    for seed in range(40):  # enough draws to reach near both ends of the range
        out, mask = sd.make_defect(image, image, kind, np.random.default_rng(seed))
        assert np.array_equal(out[mask == 0], image[mask == 0])
        shift = _shift_inside(image, out, mask)
        std = max(texture_std(image, mask), 3.0)
        assert low * std - 0.5 <= abs(shift) <= high * std + 0.5, (seed, shift, std)
        signs.add(shift > 0)
        assert abs(shift) >= max(0.75 * texture_std(image, mask), 3.0)
    assert signs == {False, True}  # darker and brighter ones


def test_a_faint_defects_contrast_follows_the_texture():
    """The same draw in an image of twice the contrast (the same texture, twice the std): the
    same place and twice the shift."""
    base = sd.smooth_noise((96, 128), 9, np.random.default_rng(6)) * 50
    weak = np.repeat((base + 100).astype(np.uint8)[..., None], 3, axis=-1)
    strong = np.repeat((2 * base + 50).astype(np.uint8)[..., None], 3, axis=-1)
    for seed in range(4):
        a, mask_a = sd.make_defect(weak, weak, "faint_blob", np.random.default_rng(seed))
        b, mask_b = sd.make_defect(strong, strong, "faint_blob", np.random.default_rng(seed))
        assert np.array_equal(mask_a, mask_b)
        assert texture_std(weak, mask_a) >= 3.0  # above the floor
        ratio = _shift_inside(strong, b, mask_b) / _shift_inside(weak, a, mask_a)
        assert ratio == pytest.approx(2.0, abs=0.15)


def test_a_faint_blob_is_small():
    """Radius 2-6% of the shorter side, each axis x 0.5-1.5, edge x at most 1.25: it spans at
    most 2 x 0.1125 of the side (an easy blob up to 2 x 0.2625)."""
    image = _textured((200, 240), seed=7)
    for seed in range(10):
        _, mask = sd.make_defect(image, image, "faint_blob", np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        assert max(np.ptp(ys), np.ptp(xs)) + 1 <= 2 * 0.1125 * 200 + 1


def _has_2x2_block(mask: np.ndarray) -> bool:
    m = mask.astype(bool)
    return bool(np.any(m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]))


def test_a_faint_scratch_is_one_pixel_wide_at_256_px():
    """1 px wide below 384 px (no 2 x 2 block of mask pixels anywhere, which every 2 px line
    has), round(side / 256) px above (2 px at 512)."""
    for shape in [(64, 80), (256, 256), (300, 380)]:
        image = _textured(shape, seed=8)
        for seed in range(6):
            _, mask = sd.make_defect(image, image, "faint_scratch", np.random.default_rng(seed))
            assert mask.sum() >= 0.16 * min(shape) * 0.9  # a line, at least 16% of the side
            assert not _has_2x2_block(mask), (shape, seed)
    image = _textured((512, 520), seed=8)
    _, mask = sd.make_defect(image, image, "faint_scratch", np.random.default_rng(0))
    assert _has_2x2_block(mask)


def _coordinates(shape) -> np.ndarray:
    """A donor whose pixel (y, x) is (y, x, 200): where a pasted pixel came from is readable."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full((h, w), 200)], axis=-1).astype(np.uint8)


def test_a_shifted_patch_is_the_donors_content_there_after_a_small_shift():
    """Inside the mask, the donor's pixels at one shift (sy, sx) from their own place, of
    5-20% of the shorter side, as they are (no brightness or contrast change)."""
    shape = (120, 160)
    image = _textured(shape, seed=9)
    donor = _coordinates(shape)
    for seed in range(10):
        out, mask = sd.make_defect(image, donor, "shifted_patch", np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        inside = out[ys, xs].astype(int)
        assert np.all(inside[:, 2] == 200)
        sy, sx = np.unique(inside[:, 0] - ys), np.unique(inside[:, 1] - xs)
        assert len(sy) == 1 and len(sx) == 1, "not one shift"
        size = np.hypot(sy[0], sx[0])
        assert 0.05 * 120 - 1 <= size <= 0.2 * 120 + 1, (seed, sy, sx)
        assert np.array_equal(out[mask == 0], image[mask == 0])


def test_a_matched_patch_goes_where_its_mean_matches_the_surroundings():
    """A left-to-right grey ramp (40 at the left, 214 at the right) and a checkerboard donor of
    97 and 157 (mean 127): each patch is pasted as it is (only 97s and 157s, one parity: one
    offset), where the surroundings (the widened box, without the patch) average near 127.
    Placed at random, the gap would be about 40 grey levels on average; the best of 12 places
    is far closer."""
    h, w = 80, 88
    ramp = np.tile(40 + 2 * np.arange(w), (h, 1)).astype(np.uint8)
    image = np.repeat(ramp[..., None], 3, axis=-1)
    checker = np.where((np.add.outer(np.arange(h), np.arange(w)) % 2) == 0, 97, 157)
    donor = np.repeat(checker[..., None], 3, axis=-1).astype(np.uint8)
    margin = max(3, round(0.06 * h))
    gaps = []
    for seed in range(20):
        out, mask = sd.make_defect(image, donor, "matched_patch", np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        inside = out[ys, xs].astype(int)
        assert set(np.unique(inside)) <= {97, 157}
        assert len(np.unique((inside[:, 0] == 157) ^ ((ys + xs) % 2 == 0))) == 1
        top, left = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
        box = np.zeros((h, w), bool)
        box[top : ys.max() + margin + 1, left : xs.max() + margin + 1] = True
        box[ys, xs] = False
        gaps.append(abs(ramp[box].mean() - 127.0))
        assert np.array_equal(out[mask == 0], image[mask == 0])
    assert np.mean(gaps) < 12.0, gaps


@pytest.mark.parametrize("kind", HARD)
def test_a_hard_defect_on_a_flat_image_with_a_flat_donor_is_still_visible(kind):
    """Grey 6 everywhere, the donor the same image: a patch changes nothing, the local std is
    0, so every draw is too faint and the defect is lifted by one shift to 3 grey levels (the
    floor); a faint one is drawn at 1.5-4 x 3 levels."""
    image = np.full((40, 48, 3), 6, np.uint8)
    for seed in range(4):
        out, mask = sd.make_defect(image, image.copy(), kind, np.random.default_rng(seed))
        assert mask.any() and np.array_equal(out[mask == 0], image[mask == 0])
        shift = _shift_inside(image, out, mask)
        if kind.endswith("_patch"):
            assert shift == 3.0
        else:
            assert 4.0 <= abs(shift) <= 12.5  # -6 at most downwards: clipped at 0


def test_every_kind_keeps_its_promises_on_textured_images():
    """On textured images and donors: each mask changes on average by at least 12 grey levels
    (easy kinds) or max(0.75 local std, 3) (hard ones), and only its pixels change."""
    for seed in range(3):
        image = _textured((64, 72), seed=20 + seed, lo=50, span=150)
        donor = _textured((64, 72), seed=30 + seed, lo=50, span=150)
        for kind in sd.KINDS:
            out, mask = sd.make_defect(image, donor, kind, np.random.default_rng(seed))
            change = np.abs(out.astype(float) - image)[mask == 1].mean()
            need = 12.0 if kind in EASY else max(0.75 * texture_std(image, mask), 3.0)
            assert change >= need, (kind, seed, change, need)
            assert not np.any(np.any(out != image, axis=-1) & (mask == 0))
