"""Which image files are decoded, wherever images are decoded from bytes: predict's file reading
(`grad_jax.data.images.read_image`), the service's uploads (`grad_jax.serving.uploads.decode`)
and the training data (`tfds_mvtec` layout, which the dataset builder decodes with).

PNG, JPEG, BMP and TIFF (the formats training reads) are accepted; any other format Pillow knows
is refused unless the caller allows it, so its decoder never runs; an animated or multi-page
file is refused with its frame count instead of being scored on its first frame.
"""

import io

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from grad_jax.data import images
from grad_jax.serving import uploads
from tfds_mvtec.mvtec_ad import layout

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)
OTHER = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)

#: Formats Pillow opens that the project does not read for training (issue 18, item 10).
REFUSED = ["ICO", "SGI", "PCX", "TGA", "QOI", "DDS", "WEBP", "IM", "XBM", "MSP", "EPS", "GIF"]
ACCEPTED = ["PNG", "JPEG", "BMP", "TIFF"]
LIMITS = uploads.Limits()


def _encode(fmt: str, rgb: np.ndarray = RGB) -> bytes:
    image = Image.fromarray(rgb)
    if fmt in ("XBM", "MSP"):  # 1-bit formats
        image = image.convert("1")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _frames(fmt: str, first: np.ndarray = RGB, second: np.ndarray = OTHER) -> bytes:
    """Two frames of different content in one file (animated GIF/PNG, two-page TIFF, MPO)."""
    buffer = io.BytesIO()
    first, second = Image.fromarray(first), Image.fromarray(second)
    first.save(buffer, format=fmt, save_all=True, append_images=[second])
    return buffer.getvalue()


def _pillow_rgb(data: bytes) -> np.ndarray:
    """The first (primary) picture as plain Pillow decodes it, independent of grad_jax."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_the_refused_formats_are_formats_pillow_opens():
    """Guards the test itself: Pillow would decode every one of them if asked."""
    for fmt in REFUSED:
        with Image.open(io.BytesIO(_encode(fmt))) as image:
            assert image.format == fmt


@pytest.mark.parametrize("fmt", REFUSED)
def test_uploads_refuse_other_formats_with_415(fmt):
    with pytest.raises(uploads.UploadError) as caught:
        uploads.decode(_encode(fmt), "part.png", LIMITS)
    err = caught.value
    assert err.status == 415
    assert str(err).startswith("part.png: ")
    assert "PNG, JPEG, BMP, TIFF" in err.reason


@pytest.mark.parametrize("fmt", REFUSED)
def test_read_image_refuses_other_formats(fmt, tmp_path):
    path = tmp_path / f"part_{fmt}.png"  # an accepted name does not make the content accepted
    path.write_bytes(_encode(fmt))
    with pytest.raises(layout.BadImageError) as caught:
        images.read_image(path)
    assert caught.value.path == path
    assert "PNG, JPEG, BMP, TIFF" in caught.value.reason
    with pytest.raises(layout.BadImageError):  # training reads the same way
        layout.load_rgb(path)


def test_a_recognisable_refused_format_is_named_with_the_way_to_allow_it(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(_encode("WEBP"))
    with pytest.raises(layout.BadImageError, match="WEBP.*allow_formats"):
        images.read_image(path)
    with pytest.raises(uploads.UploadError, match="WEBP.*allow_formats"):
        uploads.decode(path.read_bytes(), "photo.png", LIMITS)


@pytest.mark.parametrize("fmt", [f for f in REFUSED if f != "EPS" or EpsImagePlugin.gs_binary])
def test_the_caller_may_allow_other_formats(fmt, tmp_path):
    data = _encode(fmt)
    want = _pillow_rgb(data)
    np.testing.assert_array_equal(uploads.decode(data, "x", LIMITS, allow_formats=[fmt]), want)
    path = tmp_path / "x.img"
    path.write_bytes(data)
    np.testing.assert_array_equal(images.read_image(path, allow_formats=[fmt.lower()]), want)


@pytest.mark.parametrize("fmt", ACCEPTED)
def test_the_training_formats_are_accepted(fmt, tmp_path):
    data = _encode(fmt)
    want = _pillow_rgb(data)
    if fmt != "JPEG":
        np.testing.assert_array_equal(want, RGB)  # lossless: the pixels themselves
    np.testing.assert_array_equal(uploads.decode(data, "x", LIMITS), want)
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    np.testing.assert_array_equal(images.read_image(path), want)
    np.testing.assert_array_equal(layout.load_rgb(path), want)


def test_unknown_format_names_are_refused():
    with pytest.raises(ValueError, match="'FOO'.*WEBP"):
        uploads.decode(_encode("PNG"), "x", LIMITS, allow_formats=["FOO"])
    with pytest.raises(ValueError, match="'FOO'"):
        layout.accepted_formats(["FOO"])


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF"])
def test_animated_and_multi_page_files_are_refused_everywhere(fmt, tmp_path):
    data = _frames(fmt)
    with Image.open(io.BytesIO(data)) as image:  # guards the test: really two frames
        assert image.n_frames == 2
    extra = ["GIF"] if fmt == "GIF" else []
    with pytest.raises(uploads.UploadError) as caught:
        uploads.decode(data, "anim.bin", LIMITS, allow_formats=extra)
    assert caught.value.status == 422 and caught.value.name == "anim.bin"
    assert "2 frames" in caught.value.reason
    path = tmp_path / "anim.bin"
    path.write_bytes(data)
    with pytest.raises(layout.BadImageError, match="2 frames") as caught:
        images.read_image(path, allow_formats=extra)
    assert caught.value.path == path
    if not extra:  # training reads PNG and TIFF
        with pytest.raises(layout.BadImageError, match="2 frames"):
            layout.load_rgb(path)


def test_a_jpeg_with_extra_pictures_is_read_as_its_primary_picture(tmp_path):
    """MPO: a JPEG whose extra pictures (a camera's preview, a second view) follow the primary
    one. Every JPEG reader shows the primary picture; so do training, predict and the service."""
    ramp = np.linspace(0, 255, 24, dtype=np.uint8)
    primary = np.stack(np.broadcast_arrays(ramp[None, :], ramp[::-1, None][:20], 128), -1)
    primary = primary.astype(np.uint8)
    data = _frames("MPO", primary, 255 - primary)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "MPO" and image.n_frames == 2
    want = _pillow_rgb(data)
    assert np.abs(want.astype(int) - primary).mean() < 4  # the primary picture, not the second
    np.testing.assert_array_equal(uploads.decode(data, "cam.jpg", LIMITS), want)
    path = tmp_path / "cam.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(images.read_image(path), want)
    np.testing.assert_array_equal(layout.load_rgb(path), want)
