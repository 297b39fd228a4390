"""Evaluation-time map smoothing and image scores, on the device (inside the jitted predict).

The reference recipe: every anomaly map is smoothed by a 21x21 box mean with zero padding and a
constant divisor of 441 (avg_pool2d with count_include_pad=True), and an image's score is the
maximum of a 32x32 box mean ('valid', no padding) of the smoothed map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _box_sum(maps: jax.Array, size: int, pad: int) -> jax.Array:
    """Separable box sum over the last two axes of `[B, H, W]`, zero padding `pad` per side."""
    window = jax.lax.reduce_window(
        maps, 0.0, jax.lax.add, (1, size, 1), (1, 1, 1), ((0, 0), (pad, pad), (0, 0))
    )
    return jax.lax.reduce_window(
        window, 0.0, jax.lax.add, (1, 1, size), (1, 1, 1), ((0, 0), (0, 0), (pad, pad))
    )


def smooth(maps: jax.Array, size: int) -> jax.Array:
    """Zero-padded size x size box mean, same output size (size odd), divisor size**2."""
    if size <= 1:
        return maps
    return _box_sum(maps.astype(jnp.float32), size, size // 2) / float(size * size)


def image_scores(smoothed: jax.Array, pool: int) -> jax.Array:
    """Max over positions of the pool x pool 'valid' box mean: `[B, H, W]` -> `[B]`."""
    pool = min(pool, smoothed.shape[1], smoothed.shape[2])
    return jnp.max(_box_sum(smoothed, pool, 0), axis=(1, 2)) / float(pool * pool)
