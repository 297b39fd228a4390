"""The nearest-neighbour baseline's core (PatchCore-style): patch features, memory bank, kNN map.

Pure JAX, no I/O. On the footing of GRAD's own map: the patch features are the neck's output
`x` `[B, h, w, C]` (the backbone stages brought to stride 8 and concatenated, `neck.mfcn`),
averaged over a 3x3 neighbourhood; the memory bank is a greedy k-center coreset of the training
images' patch features; a patch's anomaly value is its Euclidean distance to the nearest bank
entry, and the `[B, h, w]` distances are upsampled to the input size by the function GRAD's
map uses (`grid_ops.resize_align_corners`), ready for `scoring.smooth` / `scoring.image_scores`.

    x = model.neck(stage_features)  # [B, h, w, C]: C = 152 for Lite0 stages 3 + 4
    patches = patch_features(x).reshape(-1, C)  # training images' patches, e.g. from the cache
    bank, _ = build_memory_bank(patches, fraction=0.1)  # [M, C]
    maps = knn_map(x, bank, upsample=model.out_stride)  # [B, h*8, w*8] = the input size

Squared distances are computed as |a|^2 - 2 a.b + |b|^2 (matrix products, HIGHEST precision so
that TF32 or bfloat16 defaults on accelerators never reach them) and clamped at 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from grad_jax.errors import ConfigError
from grad_jax.models.grid_ops import resize_align_corners

_HIGHEST = jax.lax.Precision.HIGHEST


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _in_range_counts(n: int, radius: int) -> np.ndarray:
    """`[n]`: how many of positions i - radius .. i + radius lie inside 0 .. n - 1."""
    i = np.arange(n)
    return np.minimum(i + radius, n - 1) - np.maximum(i - radius, 0) + 1


def patch_features(x: jax.Array, size: int = 3) -> jax.Array:
    """Neck features `[B, h, w, C]` -> patch features `[B, h, w, C]` float32.

    Each position becomes the mean of the size x size neighbourhood around it (PatchCore's
    local neighbourhood aggregation; stride 1, same size). Border rule: the mean is over the
    neighbours inside the map (a corner averages 2x2 = 4 positions for size 3, an edge 2x3), so
    a border patch is the mean of features it really has; PatchCore's zero padding with a
    constant divisor would shrink border patches towards 0 instead.
    """
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"patch size {size} must be an odd number >= 1 (3 = PatchCore's)")
    x = x.astype(jnp.float32)
    if size == 1:
        return x
    r = size // 2
    h, w = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    rows = sum(padded[:, i : i + h] for i in range(size))  # [B, h, w + 2r, C]
    total = sum(rows[:, :, j : j + w] for j in range(size))  # [B, h, w, C]
    counts = np.outer(_in_range_counts(h, r), _in_range_counts(w, r)).astype(np.float32)
    return total / jnp.asarray(counts)[None, :, :, None]


def coreset_size(n: int, fraction: float) -> int:
    """`m = ceil(fraction * n)` (at least 1), the product rounded to 9 decimals first so that
    float noise does not add a point (0.07 * 100 = 7.000000000000001 gives 7, not 8)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"memory bank fraction {fraction!r} must be in (0, 1] (the share of training "
            "patches kept; 0.1 = PatchCore's 10%)"
        )
    if n < 1:
        raise ConfigError("the memory bank needs at least one training patch; got none")
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def _sq_norms(a: jax.Array) -> jax.Array:
    return jnp.sum(a * a, axis=-1)


def greedy_coreset(
    features: jax.Array,
    m: int,
    *,
    key: jax.Array | None = None,
    projection_dim: int | None = None,
    buffer_size: int = 4096,
    row_chunk: int = 4096,
    centre_chunk: int = 256,
) -> jax.Array:
    """Greedy k-center (farthest-point) coreset: `features` `[N, D]` -> indices `[m]` int32.

    The rule: the first index is 0 (or, with `key`, `jax.random.randint(k0, (), 0, N)` where
    `k0, k1 = jax.random.split(key)`); each next index is the not yet selected point whose
    squared Euclidean distance to its nearest selected point is largest, ties going to the
    lowest index (as `argmax` breaks them). Indices come in selection order and never repeat,
    so m = N selects every point (duplicates of selected points, at distance 0, come last).
    With `projection_dim` < D the rule runs on the features times a Gaussian matrix
    `jax.random.normal(k1, (D, projection_dim)) / sqrt(projection_dim)` (PatchCore's
    Johnson-Lindenstrauss approximation; without `key`, k1 comes from `jax.random.key(0)`);
    otherwise on the features themselves. Deterministic for a key.

    The computation is exact for that rule (up to float32 rounding of the distances), but
    does not scan all N points at every step, which would read `N*D` floats per step and is
    bound by memory bandwidth (about 25 ms a step for 540k x 128 on 2 CPU cores). It keeps the
    `buffer_size` points of largest distance with their distances kept current, and a bound
    `tau` on every other point's distance (their distances, only ever falling, were at most
    `tau` when the buffer was made). While the buffer's best exceeds `tau` it is the global
    best; otherwise the distances of all N points are brought up to date against the centres
    selected since the last such refresh in one blocked matrix product (`row_chunk` points x
    `centre_chunk` centres at a time, compute- rather than memory-bound) and the buffer is
    made again. Every point still meets every centre once, `N*m*D` multiply-adds in all.
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2:
        raise ConfigError(f"coreset features must be [N, D]; got shape {features.shape}")
    n, d = features.shape
    if not 1 <= m <= n:
        raise ConfigError(f"coreset size {m} must be between 1 and the {n} points")
    start_key, projection_key = jax.random.split(jax.random.key(0) if key is None else key)
    start = 0 if key is None else int(jax.random.randint(start_key, (), 0, n))
    if projection_dim is not None and projection_dim < d:
        if projection_dim < 1:
            raise ConfigError(f"projection_dim {projection_dim} must be >= 1 (or None)")
        matrix = jax.random.normal(projection_key, (d, projection_dim)) / np.sqrt(projection_dim)
        features = jnp.dot(features, matrix, precision=_HIGHEST)
    if m == 1:
        return jnp.asarray([start], jnp.int32)
    rows = min(row_chunk, _round_up(n, 8))
    padded = jnp.pad(features, ((0, _round_up(n, rows) - n), (0, 0)))
    return _greedy(
        padded, jnp.int32(start), n=n, m=m, buffer=buffer_size, rows=rows, centres=centre_chunk
    )


@functools.partial(jax.jit, static_argnames=("n", "m", "buffer", "rows", "centres"))
def _greedy(x, start, *, n: int, m: int, buffer: int, rows: int, centres: int):
    """The loop of `greedy_coreset` on rows `x` `[Np, D]` (rows from `n` on are padding)."""
    n_pad, _ = x.shape
    k = min(buffer, n_pad - 1)
    sq = _sq_norms(x)
    neg_inf = jnp.float32(-jnp.inf)

    def record(t, idx, sel, cen, csq):
        return sel.at[t].set(idx), cen.at[t].set(x[idx]), csq.at[t].set(sq[idx])

    def refresh(mind, cen, csq, first, stop):
        """min(mind, squared distance to centres first..stop-1), for every row."""
        n_blocks = (stop - first + centres - 1) // centres

        def row_block(r, mind):
            xr = jax.lax.dynamic_slice_in_dim(x, r * rows, rows)
            sq_r = jax.lax.dynamic_slice_in_dim(sq, r * rows, rows)

            def centre_block(b, best):
                s = first + b * centres
                c = jax.lax.dynamic_slice_in_dim(cen, s, centres)
                cs = jax.lax.dynamic_slice_in_dim(csq, s, centres)  # inf: not a centre yet
                partial = cs[None] - 2.0 * jnp.dot(xr, c.T, precision=_HIGHEST)
                return jnp.minimum(best, jnp.min(partial, axis=1))

            best = jax.lax.fori_loop(0, n_blocks, centre_block, jnp.full((rows,), jnp.inf))
            d2 = jnp.maximum(best + sq_r, 0.0)
            old = jax.lax.dynamic_slice_in_dim(mind, r * rows, rows)
            return jax.lax.dynamic_update_slice_in_dim(mind, jnp.minimum(old, d2), r * rows, 0)

        return jax.lax.fori_loop(0, n_pad // rows, row_block, mind)

    def buffer_step(state):
        """Bring the buffer up to date with the newest centre; its best and whether it wins."""
        t, sel, cen, csq, buf, bx, bsq, bval, tau = state
        d2 = bsq - 2.0 * jnp.dot(bx, cen[t - 1], precision=_HIGHEST) + csq[t - 1]
        bval = jnp.minimum(bval, jnp.maximum(d2, 0.0))
        j = jnp.argmax(bval)  # the buffer is sorted by index: ties go to the lowest
        return bval, j, bval[j] > tau

    def inner_cond(carry):
        state, _, ok = carry
        return ok & (state[0] < m)

    def inner_body(carry):
        (t, sel, cen, csq, buf, bx, bsq, bval, tau), j, _ = carry
        sel, cen, csq = record(t, buf[j], sel, cen, csq)
        state = (t + 1, sel, cen, csq, buf, bx, bsq, bval.at[j].set(neg_inf), tau)
        bval, j, ok = buffer_step(state)
        return (*state[:7], bval, tau), j, ok

    def outer_body(carry):
        t, first, mind, sel, cen, csq = carry
        mind = refresh(mind, cen, csq, first, t)
        mind = mind.at[sel].set(neg_inf, mode="drop")  # selected (unset slots hold n_pad)
        idx = jnp.argmax(mind)
        sel, cen, csq = record(t, idx, sel, cen, csq)
        mind = mind.at[idx].set(neg_inf)
        values, top = jax.lax.top_k(mind, k + 1)
        buf = jnp.sort(top[:k])
        state = (t + 1, sel, cen, csq, buf, x[buf], sq[buf], mind[buf], values[k])
        bval, j, ok = buffer_step(state)
        state, _, _ = jax.lax.while_loop(
            inner_cond, inner_body, ((*state[:7], bval, state[8]), j, ok)
        )
        t_new, sel, cen, csq = state[:4]
        return t_new, t, mind, sel, cen, csq

    mind = jnp.where(jnp.arange(n_pad) < n, jnp.inf, neg_inf)  # padding is never selected
    mind = mind.at[start].set(neg_inf)
    sel = jnp.full((m,), n_pad, jnp.int32)
    cen = jnp.zeros((m + centres, x.shape[1]), jnp.float32)  # + a block: slices never clamp
    csq = jnp.full((m + centres,), jnp.inf, jnp.float32)  # slots not yet filled count as far
    sel, cen, csq = record(0, start, sel, cen, csq)
    carry = (jnp.int32(1), jnp.int32(0), mind, sel, cen, csq)
    carry = jax.lax.while_loop(lambda c: c[0] < m, outer_body, carry)
    return carry[3]


def build_memory_bank(
    patches: jax.Array,
    fraction: float = 0.1,
    *,
    key: jax.Array | None = None,
    projection_dim: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Training patch features `[N, C]` -> (bank `[M, C]` float32, indices `[M]` int32).

    M = `coreset_size(N, fraction)`; the indices are `greedy_coreset`'s (selection order).
    """
    patches = jnp.asarray(patches, jnp.float32)
    if patches.ndim != 2:
        raise ConfigError(f"memory bank patches must be [N, C]; got shape {patches.shape}")
    m = coreset_size(patches.shape[0], fraction)
    indices = greedy_coreset(patches, m, key=key, projection_dim=projection_dim)
    return patches[indices], indices


def nearest_distances(
    queries: jax.Array,
    bank: jax.Array,
    *,
    query_chunk: int = 1024,
    bank_chunk: int = 2048,
) -> jax.Array:
    """Queries `[Q, C]`, bank `[M, C]` -> `[Q]` float32: each query's Euclidean distance to its
    nearest bank entry.

    Computed as sqrt(max(0, |q|^2 + min_b(|b|^2 - 2 q.b))) over `query_chunk` x `bank_chunk`
    blocks (memory: one such block of float32, 8 MB by default, whatever Q and M). The clamp
    keeps the sqrt real: no NaN from rounding. Precision: the squared distance's absolute
    error is a few float32 ulps of |q|^2 + |b|^2, so a bank member's distance is 0 to within
    the square root of that (about 0.03 for Lite0 patches, |x|^2 ~ 3000, whose nearest
    distances are tens). Only the minimum is tracked: an argmin would double the CPU cost.
    """
    queries = jnp.asarray(queries, jnp.float32)
    bank = jnp.asarray(bank, jnp.float32)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ConfigError(
            f"nearest neighbours need queries [Q, C] and a bank [M, C] with the same C; got "
            f"{queries.shape} and {bank.shape}"
        )
    if bank.shape[0] == 0:
        raise ConfigError("the memory bank is empty")
    if queries.shape[0] == 0:
        return jnp.zeros((0,), jnp.float32)
    return _nearest(queries, bank, query_chunk=query_chunk, bank_chunk=bank_chunk)


@functools.partial(jax.jit, static_argnames=("query_chunk", "bank_chunk"))
def _nearest(queries, bank, *, query_chunk: int, bank_chunk: int):
    q, mb = queries.shape[0], bank.shape[0]
    qc, bc = min(query_chunk, _round_up(q, 8)), min(bank_chunk, _round_up(mb, 8))
    qp = jnp.pad(queries, ((0, _round_up(q, qc) - q), (0, 0)))
    bp = jnp.pad(bank, ((0, _round_up(mb, bc) - mb), (0, 0)))
    bsq = jnp.where(jnp.arange(bp.shape[0]) < mb, _sq_norms(bp), jnp.inf)  # padding: never
    blocks = (bp.reshape(-1, bc, bp.shape[1]), bsq.reshape(-1, bc))

    def one_query_chunk(qx):
        def step(best, block):
            b, b_sq = block
            partial = b_sq[None] - 2.0 * jnp.dot(qx, b.T, precision=_HIGHEST)
            return jnp.minimum(best, jnp.min(partial, axis=1)), None

        best, _ = jax.lax.scan(step, jnp.full((qx.shape[0],), jnp.inf), blocks)
        return best + _sq_norms(qx)

    d2 = jax.lax.map(one_query_chunk, qp.reshape(-1, qc, qp.shape[1])).reshape(-1)[:q]
    return jnp.sqrt(jnp.maximum(d2, 0.0))


def knn_map(
    x: jax.Array, bank: jax.Array, *, upsample: int, patch_size: int = 3, **chunks: int
) -> jax.Array:
    """Neck features `[B, h, w, C]` and bank `[M, C]` -> anomaly map `[B, h*upsample,
    w*upsample]` float32: each patch's (`patch_features`) distance to its nearest bank entry,
    upsampled like GRAD's map (align-corners bilinear, `grid_ops.resize_align_corners`). The
    batch may be a symbolic dimension (`jax.export`)."""
    _, h, w, c = x.shape
    patches = patch_features(x, patch_size).reshape(-1, h * w, c)
    # One image at a time: every shape inside is static, so the batch may be symbolic (an
    # exported program's), and memory stays one image's blocks.
    distance = jax.lax.map(lambda p: nearest_distances(p, bank, **chunks), patches)
    return resize_align_corners(distance.reshape(-1, h, w), (h * upsample, w * upsample))


# --------------------------------------------------------------------------------------------
# Model kinds: which map the deployed model scores with.
# --------------------------------------------------------------------------------------------

#: 'grad': the method's map; 'knn': the nearest-neighbour map; 'grad+knn': both standardised by
#: the held-out normal images' pixel statistics and averaged.
KINDS = ("grad", "knn", "grad+knn")


def kind_map(
    kind: str, maps: dict[str, jax.Array], stats: dict[str, dict[str, float]] | None = None
) -> jax.Array:
    """The raw map of `kind` from the per-kind raw maps `maps` ('grad', 'knn': `[B, H, W]`).

    'grad+knn' is the mean of the two maps standardised by `stats` ({'grad': {'mean', 'std'},
    'knn': {...}}: each kind's pixel mean and standard deviation over the held-out normal
    images' raw maps), so neither map dominates by its units.
    """
    if kind in ("grad", "knn"):
        return maps[kind]
    if kind != "grad+knn":
        raise ConfigError(f"model.kind={kind!r}: one of {', '.join(KINDS)}")
    if not stats:
        raise ConfigError("model.kind='grad+knn' needs the held-out normal images' map statistics")
    z = [(maps[k] - stats[k]["mean"]) / max(stats[k]["std"], 1e-12) for k in ("grad", "knn")]
    return (z[0] + z[1]) / 2.0
