"""Image conversion shared by training, `Predictor` and the exported model (numpy + Pillow only).

Files are read as training reads them: PNG, JPEG, BMP and TIFF only (others when the caller
allows them), one frame only (`read_image`).

Any supported image becomes `[H, W, 3]` uint8 exactly as the data loader converts files
(`tfds_mvtec` layout rules: 16-bit scaled, grayscale replicated, alpha dropped, palettes
expanded), then is resized to the model input size with Pillow bilinear (antialiased when
shrinking, as the reference's torchvision Resize on PIL images).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from tfds_mvtec.mvtec_ad import layout

#: How images are brought to the model input size (written into an exported model's meta).
RESIZE_RULE = (
    "to_rgb8 (16-bit scaled to 8 bits, grayscale replicated, alpha dropped, palettes expanded), "
    "then Pillow bilinear resize to (H, W) ignoring the aspect ratio (antialiased when shrinking)"
)
_FLOAT_TOLERANCE = 1e-6  # float images may overshoot [0, 1] by this much (rounding)


def to_rgb8(image: Any, name: str = "<image>") -> np.ndarray:
    """Any supported image -> `[H, W, 3]` uint8 at its own size, as the data loader converts.

    Accepts a Pillow image, or an array `HxW`, `HxWx1`, `HxWx3` or `HxWx4` (RGBA; alpha is
    dropped) of dtype uint8, uint16 (scaled to 8 bits as 16-bit files are) or float in [0, 1].
    Raises ValueError (BadImageError for Pillow images of an unsupported mode).
    """
    if isinstance(image, Image.Image):
        return np.asarray(layout.to_rgb8(image, name))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name}: shape {array.shape} is not an image; expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: the image is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        if array.ndim == 3:
            # Pillow reads 16-bit colour files as their high byte; do the same for arrays.
            array = (array >> 8).astype(np.uint8)
        # HxW uint16 becomes a Pillow I;16 image, which layout.to_rgb8 scales to 8 bits.
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: the float image holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"{name}: float images must lie in [0, 1], this one spans [{low:.4g}, {high:.4g}]"
            )
        array = np.rint(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{name}: dtype {array.dtype} is not supported (uint8, uint16 or float)")
    return np.asarray(layout.to_rgb8(Image.fromarray(np.ascontiguousarray(array)), name))


def read_image(path: str | os.PathLike, allow_formats: Iterable[str] = ()) -> np.ndarray:
    """An image file as `[H, W, 3]` uint8 at its own size; BadImageError if it cannot be read.

    The file's content (not its name) must be PNG, JPEG, BMP or TIFF, or one of the Pillow
    formats named in `allow_formats` (e.g. `('WEBP',)`): no other decoder runs on it. An animated
    or multi-page file is refused with its frame count (see `tfds_mvtec` layout `open_image`).
    ValueError for a format name Pillow does not know.
    """
    formats = layout.accepted_formats(allow_formats)
    image = layout.open_image(layout.read_bytes(path), path, formats)
    try:
        return np.asarray(layout.to_rgb8(image, path))
    except (ValueError, OSError) as err:
        if isinstance(err, layout.BadImageError):
            raise
        raise layout.BadImageError(path, f"cannot convert to RGB ({err})") from err


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """HxWx3 uint8 -> size (h, w) with Pillow bilinear (antialiased when shrinking)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
