"""The one-point lookup and align-corners resizing against brute-force numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grad_jax.models import grid_ops, layers


def brute_force_bilinear(grid, x, y):
    """grid_sample(bilinear, zeros, align_corners=False) at one point, by its 4 neighbours."""
    g_y, g_x, depth = grid.shape
    ix = ((x + 1) * g_x - 1) / 2
    iy = ((y + 1) * g_y - 1) / 2
    x0, y0 = int(np.floor(ix)), int(np.floor(iy))
    out = np.zeros(depth)
    for yy, wy in ((y0, 1 - (iy - y0)), (y0 + 1, iy - y0)):
        for xx, wx in ((x0, 1 - (ix - x0)), (x0 + 1, ix - x0)):
            if 0 <= yy < g_y and 0 <= xx < g_x:  # zero padding outside
                out += wy * wx * grid[yy, xx]
    return out


def test_lookup_matches_brute_force_including_out_of_range():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(5, 7, 3)).astype(np.float32)
    points = rng.uniform(-1.3, 1.3, size=(400, 2)).astype(np.float32)
    points[:4] = [[-1.3, 1.3], [1.0, -1.0], [1.2, 0.0], [0.0, -1.25]]
    got = np.asarray(grid_ops.lookup_points(jnp.asarray(grid), jnp.asarray(points)))
    want = np.stack([brute_force_bilinear(grid, x, y) for x, y in points])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # far outside: every neighbour is padding
    far = grid_ops.bilinear_lookup(jnp.asarray(grid), jnp.asarray([1.3, 1.3]))
    np.testing.assert_allclose(far, brute_force_bilinear(grid, 1.3, 1.3), atol=1e-6)


def test_batched_lookup_shapes_and_values():
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(4, 4, 6)).astype(np.float32)
    pts = rng.uniform(-1, 1, size=(2, 9, 2)).astype(np.float32)
    got = np.asarray(grid_ops.lookup_batch(jnp.asarray(grid), jnp.asarray(pts)))
    assert got.shape == (2, 9, 6)
    np.testing.assert_allclose(got[1, 4], brute_force_bilinear(grid, *pts[1, 4]), atol=1e-5)


def test_global_grid_node_centres_return_stored_maps():
    # Node (a, b) of a [G, G, H, W, C] grid holds a known (H, W, C) map; sampling exactly at
    # the node centre u = (2k + 1) / G - 1 must return that map after the reshape.
    g, h, w, c = 4, 3, 5, 2
    grid = np.zeros((g, g, h, w, c), np.float32)
    for a in range(g):
        for b in range(g):
            grid[a, b] = 100 * a + 10 * b + np.arange(h * w * c).reshape(h, w, c)
    flat = jnp.asarray(grid.reshape(g, g, h * w * c))
    for a in range(g):
        for b in range(g):
            point = jnp.asarray([(2 * b + 1) / g - 1, (2 * a + 1) / g - 1])  # (x, y)
            got = np.asarray(grid_ops.bilinear_lookup(flat, point)).reshape(h, w, c)
            np.testing.assert_allclose(got, grid[a, b], atol=1e-4)


def test_lookup_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    grid = jnp.asarray(rng.normal(size=(6, 6, 2)).astype(np.float32))
    point = jnp.asarray([0.113, -0.377])
    f = lambda p: jnp.sum(grid_ops.bilinear_lookup(grid, p) * jnp.asarray([1.0, -2.0]))
    grad = np.asarray(jax.grad(f)(point))
    eps = 1e-3
    fd = [(f(point.at[i].add(eps)) - f(point.at[i].add(-eps))) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(grad, np.asarray(fd), rtol=1e-2)


def test_align_corners_matrix_identities():
    a = grid_ops.align_corners_matrix(14, 28)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-6)
    assert a[0, 0] == 1.0 and a[27, 13] == 1.0  # corners map to corners
    np.testing.assert_allclose(grid_ops.align_corners_matrix(28, 28), np.eye(28), atol=1e-7)
    # row i reads source i * 13 / 27
    i = 5
    src = i * 13 / 27
    lo = int(np.floor(src))
    assert a[i, lo] == pytest.approx(1 - (src - lo), abs=1e-6)
    assert a[i, lo + 1] == pytest.approx(src - lo, abs=1e-6)


def test_resize_align_corners_against_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    got = np.asarray(grid_ops.resize_align_corners(jnp.asarray(x), (7, 11)))
    want = np.zeros((2, 7, 11))
    for i in range(7):
        for j in range(11):
            sy, sx = i * 3 / 6, j * 5 / 10
            y0, x0 = min(int(sy), 2), min(int(sx), 4)
            ty, tx = sy - y0, sx - x0
            want[:, i, j] = (
                (1 - ty) * (1 - tx) * x[:, y0, x0]
                + (1 - ty) * tx * x[:, y0, x0 + 1]
                + ty * (1 - tx) * x[:, y0 + 1, x0]
                + ty * tx * x[:, y0 + 1, x0 + 1]
            )
    np.testing.assert_allclose(got, want, atol=1e-5)
    # last output row equals the last source row (14 -> 28: row 27 == source row 13)
    y = rng.normal(size=(1, 14, 14, 3)).astype(np.float32)
    up = np.asarray(grid_ops.resize_align_corners(jnp.asarray(y), (28, 28)))
    np.testing.assert_allclose(up[0, 27, 27], y[0, 13, 13], atol=1e-6)


@pytest.mark.parametrize(
    "stride,pad", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1))), (2, ((2, 2), (2, 2)))]
)
def test_depthwise_formulations_agree(stride, pad):
    rng = np.random.default_rng(4)
    k = 5 if pad[0][0] == 2 else 3
    x = jnp.asarray(rng.normal(size=(2, 11, 11, 6)).astype(np.float32))
    kern = jnp.asarray(rng.normal(size=(k, k, 6)).astype(np.float32))
    shifted = layers.depthwise(x, kern, stride, pad, impl="shifted")
    xla = layers.depthwise(x, kern, stride, pad, impl="xla")
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(xla), atol=1e-4)


# batch 11: the kernel gradient sums images in chunks of 8, so this covers a partial chunk.
@pytest.mark.parametrize("k,batch", [(3, 2), (5, 2), (3, 11)])
def test_depthwise_gradients_match_xla_convolution(k, batch):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(batch, 9, 9, 4)).astype(np.float32))
    kern = jnp.asarray(rng.normal(size=(k, k, 4)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(batch, 9, 9, 4)).astype(np.float32))
    pad = ((k // 2, k // 2), (k // 2, k // 2))

    def loss(impl):
        return lambda x, w: jnp.sum(layers.depthwise(x, w, 1, pad, impl=impl) * cot)

    got = jax.grad(loss("shifted"), argnums=(0, 1))(x, kern)
    want = jax.grad(loss("xla"), argnums=(0, 1))(x, kern)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_batch_norm_gradients_match_autodiff():
    from flax import nnx

    from grad_jax.models.model import merge

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(8, 3, 3, 5)).astype(np.float32) * 3 + 1)
    cot = jnp.asarray(rng.normal(size=(8, 3, 3, 5)).astype(np.float32))
    for group in (0, 4):
        bn = layers.BatchNorm(5, eps=1e-5)
        graph, params, rest = nnx.split(bn, nnx.Param, ...)

        def ours(p, x, group=group, graph=graph, rest=rest):
            return jnp.sum(merge(graph, p, rest)(x, train=True, group_size=group) * cot)

        def plain(p, x, group=group):  # straightforward formula, differentiated by JAX
            g = 8 // group if group else 1
            xg = x.reshape(g, -1, 5)
            mean = xg.mean(axis=1, keepdims=True)
            var = ((xg - mean) ** 2).mean(axis=1, keepdims=True)
            y = (xg - mean) / jnp.sqrt(var + 1e-5) * p["scale"][...] + p["bias"][...]
            return jnp.sum(y.reshape(x.shape) * cot)

        got = jax.grad(ours, argnums=(0, 1))(params, x)
        want = jax.grad(plain, argnums=(0, 1))(params, x)
        flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
        for g, w in zip(flat_got, flat_want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
