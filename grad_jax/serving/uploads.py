"""Uploaded image bytes -> RGB arrays, within size and pixel limits; results as PNG and bytes.

Every refusal is an `UploadError` with an HTTP status and a message that names the file and the
problem, so a service can answer it as it is and keep serving:

- 400: an empty file;
- 413: a file over `max_file_bytes`, or an image over `max_pixels` (read from the header before
  any pixel is decoded, so a decompression bomb costs nothing);
- 415: bytes that are not an accepted image format: PNG, JPEG, BMP or TIFF (the formats
  training reads), or a format the caller allows (`allow_formats`); no other Pillow decoder
  ever runs on uploaded bytes;
- 422: an image whose pixels cannot be decoded (truncated, corrupt), whose mode is not
  supported (floating-point, 32-bit integer), or that holds several frames (an animation, a
  multi-page TIFF: refused rather than scored on its first frame).

Decoded images follow the training data's conversion rules (`tfds_mvtec` layout: 16-bit
scaled, grayscale replicated, alpha dropped, palettes expanded).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image

from tfds_mvtec.mvtec_ad import layout


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may carry.

    max_file_bytes: encoded size of one image; max_files: images per request;
    max_pixels: width x height of one image (default: Pillow's decompression-bomb limit);
    overlay_side: the longer side of a returned overlay PNG, in pixels.
    """

    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 16
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    overlay_side: int = 768

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if int(getattr(self, field.name)) < 1:
                raise ValueError(
                    f"{field.name} must be at least 1, got {getattr(self, field.name)}"
                )

    @property
    def max_request_bytes(self) -> int:
        """The largest request body worth reading: every file at its limit, plus the form."""
        return self.max_files * self.max_file_bytes + 1024 * 1024


class UploadError(ValueError):
    """An upload that cannot be scored: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.status = status
        self.name = name
        self.reason = reason


def check_size(data: bytes, name: str, limits: Limits) -> None:
    """UploadError unless `data` is non-empty and within `limits.max_file_bytes`."""
    if not data:
        raise UploadError(400, name, "the file is empty (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise UploadError(
            413,
            name,
            f"the file has {len(data):,} bytes, over the limit of {limits.max_file_bytes:,}",
        )


def decode(data: bytes, name: str, limits: Limits, allow_formats: Iterable[str] = ()) -> np.ndarray:
    """Encoded image bytes -> `[H, W, 3]` uint8 at the image's own size.

    Only PNG, JPEG, BMP and TIFF are opened, and the Pillow formats named in `allow_formats`
    (e.g. `('WEBP',)`; ValueError for a name Pillow does not know). The header is read first,
    and the pixel count checked against `limits.max_pixels` and the frame count against 1,
    before any pixel is decoded. Raises UploadError (see the module docstring for the statuses).
    """
    formats = layout.accepted_formats(allow_formats)
    check_size(data, name, limits)
    with warnings.catch_warnings():
        # Our own limit decides; Pillow's warning (and its error at twice its limit) would
        # otherwise fire first, with a less useful message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=formats)
        except Image.UnidentifiedImageError:
            raise UploadError(415, name, layout.refused_format_reason(data, formats)) from None
        except Image.DecompressionBombError as err:
            raise UploadError(413, name, f"refused as a decompression bomb ({err})") from None
        except Exception as err:  # noqa: BLE001 - Pillow raises many types on corrupt headers
            raise UploadError(
                422, name, f"cannot parse the image header ({type(err).__name__}: {err})"
            ) from None
        width, height = image.size
        if width * height > limits.max_pixels:
            raise UploadError(
                413,
                name,
                f"the image is {width} x {height} = {width * height:,} pixels, over the limit of "
                f"{limits.max_pixels:,}",
            )
        if width * height == 0:
            raise UploadError(422, name, f"the image has no pixels ({width} x {height})")
        try:
            layout.check_single_frame(image, name)
            image.load()
        except layout.BadImageError as err:
            raise UploadError(422, name, err.reason) from None
        except Exception as err:  # noqa: BLE001
            raise UploadError(
                422,
                name,
                f"cannot decode the pixels, probably truncated ({type(err).__name__}: {err})",
            ) from None
    try:
        return np.asarray(layout.to_rgb8(image, name))
    except layout.BadImageError as err:
        raise UploadError(422, name, err.reason) from None
    except (ValueError, OSError) as err:
        raise UploadError(422, name, f"cannot convert to RGB ({err})") from None


def encode_map(anomaly_map: np.ndarray) -> dict:
    """A float32 map as JSON: shape, dtype and the little-endian bytes in base64."""
    array = np.ascontiguousarray(anomaly_map, dtype="<f4")
    return {
        "shape": list(array.shape),
        "dtype": "float32",
        "byteorder": "little",
        "base64": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def decode_map(encoded: dict) -> np.ndarray:
    """The inverse of `encode_map`."""
    data = base64.b64decode(encoded["base64"])
    return np.frombuffer(data, dtype="<f4").reshape(encoded["shape"]).astype(np.float32)
