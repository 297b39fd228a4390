"""Synthetic defects (`data.synthetic_defects`): kinds in turn, seeded, each one visible, the
mask exactly the replaced pixels, cut-paste patches from the donor, holes that scale the
brightness. (`selection_test.py` checks the exact mask of every kind on a textured image.)"""

import numpy as np
import pytest

from grad_jax.data import synthetic_defects as sd


def _textured(shape=(48, 64), seed=0, lo=90, span=80):
    base = (sd.smooth_noise(shape, 5, np.random.default_rng(seed)) * span + lo).astype(np.uint8)
    return np.repeat(base[..., None], 3, axis=-1)


def test_kinds_come_in_turn_across_images_and_the_draw_is_seeded():
    images = [_textured(seed=s) for s in range(3)]
    donors = [_textured(seed=10), _textured(seed=11)]
    out = sd.make_defects(images, donors, 2, seed=5)
    assert [(i, kind) for i, kind, _, _ in out] == [
        (0, "cutpaste"), (0, "noise_blob"), (1, "scratch"), (1, "hole"),
        (2, "cutpaste"), (2, "noise_blob"),
    ]  # fmt: skip
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


@pytest.mark.parametrize("kind", sd.KINDS)
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
