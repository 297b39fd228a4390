"""The kNN baseline's core against brute-force numpy references written here.

The greedy k-center reference selects one point a step by scanning every point in float64; the
module's buffered, blocked version must choose the same indices. Small chunk and buffer sizes
make the tiny inputs go through every path (buffer steps, refreshes, padded blocks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grad_jax.errors import ConfigError
from grad_jax.models import knn

SMALL = {"buffer_size": 8, "row_chunk": 32, "centre_chunk": 4}  # many refreshes, padded rows


def brute_force_patches(x: np.ndarray, size: int) -> np.ndarray:
    """Each position: the mean of the size x size neighbours that lie inside the map."""
    b, h, w, c = x.shape
    r = size // 2
    out = np.zeros(x.shape, np.float64)
    for i in range(h):
        for j in range(w):
            window = x[:, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
            out[:, i, j] = window.reshape(b, -1, c).mean(axis=1)
    return out


def brute_force_greedy(x: np.ndarray, m: int, start: int = 0) -> np.ndarray:
    """Farthest-point rule, one full float64 scan a step; argmax takes the lowest index."""
    x = x.astype(np.float64)
    nearest = np.full(len(x), np.inf)
    selected = [start]
    while len(selected) < m:
        nearest = np.minimum(nearest, ((x - x[selected[-1]]) ** 2).sum(axis=1))
        nearest[selected] = -np.inf
        selected.append(int(np.argmax(nearest)))
    return np.asarray(selected)


def brute_force_nearest(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    return np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1)).min(axis=1)


def upsample_align_corners(d: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear `[B, h, w]` -> `[B, out_h, out_w]`, corners on corners, one pixel at a time."""
    _, h, w = d.shape
    out = np.zeros((d.shape[0], out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1)
        y0 = min(int(np.floor(y)), h - 2)
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1)
            x0 = min(int(np.floor(x)), w - 2)
            fy, fx = y - y0, x - x0
            out[:, i, j] = (
                (1 - fy) * (1 - fx) * d[:, y0, x0]
                + (1 - fy) * fx * d[:, y0, x0 + 1]
                + fy * (1 - fx) * d[:, y0 + 1, x0]
                + fy * fx * d[:, y0 + 1, x0 + 1]
            )
    return out


@pytest.mark.parametrize("size", [3, 5])
def test_patch_features_are_the_in_range_neighbourhood_mean(size):
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    got = np.asarray(knn.patch_features(jnp.asarray(x), size))
    np.testing.assert_allclose(got, brute_force_patches(x, size), rtol=1e-5, atol=1e-6)
    # the corner of a constant map stays the constant (no zero padding pulled in)
    flat = np.asarray(knn.patch_features(jnp.ones((1, 4, 4, 2)), size))
    np.testing.assert_allclose(flat, 1.0, rtol=1e-6)


def test_patch_features_size_one_is_identity_and_even_size_is_refused():
    x = jnp.arange(24.0).reshape(1, 2, 3, 4)
    np.testing.assert_array_equal(knn.patch_features(x, 1), x)
    with pytest.raises(ConfigError, match="odd"):
        knn.patch_features(x, 2)


@pytest.mark.parametrize("chunks", [SMALL, {}], ids=["small_buffer", "defaults"])
def test_coreset_matches_brute_force_greedy(chunks):
    x = np.random.default_rng(1).normal(size=(203, 5)).astype(np.float32)
    got = np.asarray(knn.greedy_coreset(jnp.asarray(x), 60, **chunks))
    np.testing.assert_array_equal(got, brute_force_greedy(x, 60))


def test_coreset_ties_and_duplicates_follow_the_lowest_index():
    # Integer points on a 4 x 4 lattice: many exact ties and duplicates, exact float32 sums.
    x = np.random.default_rng(2).integers(0, 4, size=(90, 2)).astype(np.float32)
    got = np.asarray(knn.greedy_coreset(jnp.asarray(x), 90, **SMALL))
    want = brute_force_greedy(x, 90)
    np.testing.assert_array_equal(got, want)
    distinct = len(np.unique(x, axis=0))
    # the 16 lattice sites first (at most), then the duplicates at distance 0, by index
    assert sorted(map(tuple, x[got[:distinct]])) == sorted(map(tuple, np.unique(x, axis=0)))
    rest = got[distinct:]
    np.testing.assert_array_equal(rest, np.sort(rest))


def test_coreset_ties_inside_the_buffer_go_to_the_lowest_index():
    # From 0 the farthest is 10 (index 2); then 3 (index 1) and 7 (index 3) are both at
    # distance 3: index 1 must win, though 7 was the farther one when the buffer was made.
    x = np.asarray([[0.0], [3.0], [10.0], [7.0]], np.float32)
    np.testing.assert_array_equal(brute_force_greedy(x, 4), [0, 2, 1, 3])
    np.testing.assert_array_equal(knn.greedy_coreset(jnp.asarray(x), 4), [0, 2, 1, 3])


def test_coreset_duplicates_of_spread_points():
    rng = np.random.default_rng(3)
    base = rng.integers(-6, 7, size=(40, 6)).astype(np.float32)
    x = base[rng.integers(0, 40, size=120)]  # every row repeated about three times
    got = np.asarray(knn.greedy_coreset(jnp.asarray(x), 70, **SMALL))
    np.testing.assert_array_equal(got, brute_force_greedy(x, 70))


def test_coreset_start_and_projection_follow_the_key():
    x = np.random.default_rng(4).normal(size=(150, 12)).astype(np.float32)
    key = jax.random.key(7)
    k0, k1 = jax.random.split(key)
    start = int(jax.random.randint(k0, (), 0, 150))
    got = np.asarray(knn.greedy_coreset(jnp.asarray(x), 30, key=key, **SMALL))
    np.testing.assert_array_equal(got, brute_force_greedy(x, 30, start))
    matrix = np.asarray(jax.random.normal(k1, (12, 4))) / np.sqrt(4)
    projected = x.astype(np.float64) @ matrix.astype(np.float64)
    got = np.asarray(knn.greedy_coreset(jnp.asarray(x), 30, key=key, projection_dim=4, **SMALL))
    np.testing.assert_array_equal(got, brute_force_greedy(projected, 30, start))


def test_fraction_one_selects_every_point_once():
    x = np.random.default_rng(5).normal(size=(77, 3)).astype(np.float32)
    bank, indices = knn.build_memory_bank(jnp.asarray(x), 1.0)
    np.testing.assert_array_equal(np.sort(np.asarray(indices)), np.arange(77))
    np.testing.assert_array_equal(np.asarray(bank), x[np.asarray(indices)])


def test_coreset_size_is_the_ceiling_and_bad_fractions_are_refused():
    assert knn.coreset_size(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert knn.coreset_size(31, 0.1) == 4
    assert knn.coreset_size(5, 0.01) == 1
    assert knn.coreset_size(540960, 0.1) == 54096
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="fraction"):
            knn.coreset_size(100, bad)
    with pytest.raises(ConfigError, match="between 1 and"):
        knn.greedy_coreset(jnp.zeros((4, 2)), 5)


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(53, 7)).astype(np.float32)
    queries = rng.normal(size=(37, 7)).astype(np.float32)
    queries[[3, 20]] = bank[[0, 52]]  # bank members: distance 0
    for chunks in ({"query_chunk": 8, "bank_chunk": 16}, {}):
        got = np.asarray(knn.nearest_distances(jnp.asarray(queries), jnp.asarray(bank), **chunks))
        want = brute_force_nearest(queries, bank)
        assert want[3] == want[20] == 0.0
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-5)


def test_nearest_distances_never_nan_from_rounding():
    # Large norms: |q|^2 - 2 q.b + |b|^2 of equal vectors rounds to small values of either
    # sign; the clamp must keep the square root real and the result near 0.
    rng = np.random.default_rng(7)
    bank = (1000.0 + rng.normal(size=(40, 16))).astype(np.float32)
    got = np.asarray(knn.nearest_distances(jnp.asarray(bank), jnp.asarray(bank)))
    assert np.all(np.isfinite(got))
    # float32 rounding of |q|^2 ~ 1.6e7 is ~1, so a member's distance is 0 to within a few units
    assert np.all(got <= 4.0)
    # exact in integers: members at exactly 0
    ints = jnp.asarray(rng.integers(-50, 50, size=(30, 5)), jnp.float32)
    np.testing.assert_array_equal(knn.nearest_distances(ints, ints), 0.0)


def test_nearest_distances_refuses_mismatched_shapes():
    with pytest.raises(ConfigError, match="same C"):
        knn.nearest_distances(jnp.zeros((3, 4)), jnp.zeros((5, 3)))
    with pytest.raises(ConfigError, match="empty"):
        knn.nearest_distances(jnp.zeros((3, 4)), jnp.zeros((0, 4)))


def test_knn_map_matches_numpy():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
    bank = rng.normal(size=(20, 5)).astype(np.float32)
    patches = brute_force_patches(x, 3)
    distance = brute_force_nearest(patches.reshape(-1, 5), bank).reshape(2, 4, 6)
    want = upsample_align_corners(distance, 12, 18)
    got = np.asarray(knn.knn_map(jnp.asarray(x), jnp.asarray(bank), upsample=3))
    assert got.shape == (2, 12, 18) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # inside jit, as in the predict program
    jitted = jax.jit(lambda a, b: knn.knn_map(a, b, upsample=3))(jnp.asarray(x), jnp.asarray(bank))
    np.testing.assert_allclose(np.asarray(jitted), want, atol=1e-4, rtol=1e-5)
