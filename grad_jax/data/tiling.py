"""Tiling: cut a large image into model-sized tiles and stitch the tiles' maps back.

Large images with small defects lose those defects when the whole image is resized to the model
input. With `data.tile.size > 0` the image is instead scaled by `data.tile.scale` (1.0 = native
resolution) and cut into `size x size` tiles that overlap by at least `data.tile.overlap`
pixels; the model trains on tiles and scores every tile; the tiles' raw anomaly maps are
stitched back into one map of the scaled image (overlapping pixels averaged), and only then
smoothed and scored, so an image's score and the pixel metrics see the whole image at once.

Geometry (per axis, length L, tile T, overlap O): one tile if L <= T, else
n = ceil((L - T) / (T - O)) + 1 tiles whose starts are spread evenly from 0 to L - T (rounded),
so the first and the last tile touch the borders and neighbours overlap by at least O.
Images are scaled up if needed so that both sides are at least T.

Pure numpy; no JAX and no file I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis (see the module docstring)."""
    if length <= size:
        return [0]
    if not 0 <= overlap < size:
        raise ValueError(f"overlap {overlap} must be in [0, tile size {size})")
    count = math.ceil((length - size) / (size - overlap)) + 1
    return [int(round(i * (length - size) / (count - 1))) for i in range(count)]


def tile_boxes(image_hw: Sequence[int], size: int, overlap: int) -> list[tuple[int, int]]:
    """`(y, x)` top-left corners of the tiles of an image of `image_hw` (row-major order)."""
    h, w = image_hw
    return [(y, x) for y in tile_starts(h, size, overlap) for x in tile_starts(w, size, overlap)]


def scaled_size(image_hw: Sequence[int], scale: float, size: int) -> tuple[int, int]:
    """The (height, width) an image is scaled to before tiling: `scale` times its size, raised
    (keeping the aspect ratio) so that both sides are at least one tile."""
    h, w = image_hw
    factor = max(float(scale), size / h, size / w)
    return max(size, int(round(h * factor))), max(size, int(round(w * factor)))


def cut(image: np.ndarray, boxes: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """`[H, W, ...]` -> `[T, size, size, ...]`, the tiles at `boxes`."""
    return np.stack([image[y : y + size, x : x + size] for y, x in boxes])


def stitch(
    tiles: np.ndarray, boxes: Sequence[tuple[int, int]], image_hw: Sequence[int]
) -> np.ndarray:
    """`[T, s, s]` tile maps -> `[H, W]` float32: each pixel is the mean of the tiles covering it.

    Accumulated in float64, so a constant map comes back exactly.
    """
    h, w = image_hw
    size = tiles.shape[1]
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    for tile, (y, x) in zip(tiles, boxes, strict=True):
        total[y : y + size, x : x + size] += tile
        count[y : y + size, x : x + size] += 1
    if not count.all():
        raise ValueError(f"tiles at {list(boxes)} do not cover an image of {tuple(image_hw)}")
    return (total / count).astype(np.float32)
