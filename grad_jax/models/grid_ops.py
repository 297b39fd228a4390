"""Pure array functions: the one-point grid lookup and align-corners bilinear resizing.

Coordinate convention (the one `torch.nn.functional.grid_sample` uses, which the pretrained
reference relies on): a point is `(x, y)` in `[-1, 1]`, x along the grid's columns (last spatial
axis) and y along its rows. Grids are stored `[G_y, G_x, D]`. With `align_corners=False`,
u = -1 is the outer edge of node 0's cell and node k sits at u = (2k + 1) / G - 1, so the
continuous index is i(u) = ((u + 1) G - 1) / 2. Bilinear interpolation with zero padding is
exactly a separable hat ("tent") kernel over the in-range nodes: nodes past the border simply
contribute nothing, which reproduces `padding_mode='zeros'` without any clamping or masking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hat_weights(u: jax.Array, size: int) -> jax.Array:
    """Weights `[size]` of the nodes of one axis for a scalar coordinate u."""
    index = ((u + 1.0) * size - 1.0) / 2.0
    nodes = jnp.arange(size, dtype=u.dtype)
    return jnp.maximum(0.0, 1.0 - jnp.abs(index - nodes))


def bilinear_lookup(grid: jax.Array, point: jax.Array) -> jax.Array:
    """Read a grid at one point, like grid_sample(bilinear, zeros, align_corners=False).

    grid: `[G_y, G_x, D]`; point: `[2]` as (x, y). Returns `[D]`. Written for one point and
    vmapped: under `jax.vmap` the weight rows stack into a `[P, G_y*G_x]` matrix and the read
    becomes one matrix product with the flattened grid.
    """
    g_y, g_x, depth = grid.shape
    w_y = hat_weights(point[1], g_y)
    w_x = hat_weights(point[0], g_x)
    weights = (w_y[:, None] * w_x[None, :]).reshape(g_y * g_x)
    return jnp.dot(weights.astype(grid.dtype), grid.reshape(g_y * g_x, depth))


# [P, 2] points -> [P, D]; then batched: [B, P, 2] -> [B, P, D]. The grid is shared.
lookup_points = jax.vmap(bilinear_lookup, in_axes=(None, 0))
lookup_batch = jax.vmap(lookup_points, in_axes=(None, 0))


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` bilinear interpolation matrix with align_corners=True.

    Output i reads source coordinate i (n_in - 1) / (n_out - 1): corners map onto corners, as
    torch's UpsamplingBilinear2d does. (jax.image.resize uses half-pixel centres instead.)
    """
    matrix = np.zeros((n_out, n_in), np.float64)
    if n_out == 1 or n_in == 1:
        matrix[:, 0] = 1.0
        return matrix.astype(np.float32)
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - lo
    rows = np.arange(n_out)
    matrix[rows, lo] = 1.0 - frac
    matrix[rows, lo + 1] += frac
    return matrix.astype(np.float32)


def resize_align_corners(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize with align_corners=True of `[B, H, W, C]` or `[B, H, W]` to `out_hw`."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(out_hw):
        return x
    a_h = jnp.asarray(align_corners_matrix(h, out_hw[0]), x.dtype)
    a_w = jnp.asarray(align_corners_matrix(w, out_hw[1]), x.dtype)
    if x.ndim == 3:
        return jnp.einsum("oh,bhw,pw->bop", a_h, x, a_w)
    y = jnp.einsum("oh,bhwc->bowc", a_h, x)
    return jnp.einsum("pw,bowc->bopc", a_w, y)
