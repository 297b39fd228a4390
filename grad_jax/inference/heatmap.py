"""The heat-map overlay: an anomaly map in jet colours blended over its image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def overlay(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an image.

    image: `[H, W, 3]` uint8; anomaly_map: `[H, W]` float at the same size; values are mapped
    linearly from [vmin, vmax] to the colour scale (blue = low, red = high) and clipped.
    Returns `[H, W, 3]` uint8.
    """
    from matplotlib import colormaps  # heavy: imported on the first overlay, not with the module

    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"image {image.shape[:2]} and map {anomaly_map.shape} differ in size")
    span = max(float(vmax) - float(vmin), 1e-12)
    level = np.clip((anomaly_map.astype(np.float64) - vmin) / span, 0.0, 1.0)
    colours = colormaps["jet"](level)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def overlay_image(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    max_side: int | None = None,
) -> np.ndarray:
    """The map (`[h, w]` float, any size) in jet colours over the image (`[H, W, 3]` uint8).

    With `max_side`, the image is first shrunk so that its longer side is at most that (never
    enlarged); the map is resized to the image with Pillow bilinear.
    """
    h, w = image.shape[:2]
    scale = 1.0 if max_side is None else min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # Pillow order: (W, H)
    if size != (w, h):
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    heat = np.ascontiguousarray(anomaly_map, np.float32)
    if heat.shape != image.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize(size, Image.BILINEAR))
    return overlay(image, heat, vmin, vmax)


def png_bytes(image: np.ndarray) -> bytes:
    """`[H, W, 3]` uint8 -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
