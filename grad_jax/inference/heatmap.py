"""The heat-map overlay: an anomaly map in jet colours blended over its image."""

from __future__ import annotations

import numpy as np


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
