"""Convolution, dense and batch-norm building blocks shared by the backbone and the head.

Every convolution of the model goes through the three functions below (`pointwise`, `depthwise`,
`conv2d`) so that the formulation that is fastest on the backend in use can be chosen in one place
and tested for equality against the others. Layout is NHWC; kernels are stored as
`pointwise: [C_in, C_out]`, `depthwise: [k, k, C]`, `conv2d: [k, k, C_in, C_out]` (HWIO).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Padding = tuple[tuple[int, int], tuple[int, int]]

# Depthwise formulations: 'shifted' sums k*k strided slices (fast on XLA:CPU, where a grouped
# convolution runs several times slower), 'xla' uses lax.conv_general_dilated with
# feature_group_count (cuDNN / TPU convolutions). 'auto' picks per backend at trace time.
DEPTHWISE_IMPLS = ("auto", "shifted", "xla")


def resolve_depthwise_impl(impl: str) -> str:
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "xla"
    return impl


def pointwise(x: jax.Array, kernel: jax.Array, dtype=None) -> jax.Array:
    """1x1 convolution as one matrix product. x: `[..., C_in]`, kernel: `[C_in, C_out]`.

    The product is taken on `[N, C_in]` rows, not on the 4-D tensor: the weight gradient is then
    a plain `x^T g` that XLA:CPU runs without first transposing an activation (contracting
    over batch and space, it transposed one operand inside the elementwise backward pass that
    produced it, one of the slowest operations of a training step's profile).
    """
    dtype = dtype or x.dtype
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)
    return jnp.dot(rows, kernel.astype(dtype)).reshape(x.shape[:-1] + (kernel.shape[-1],))


def depthwise(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: Padding = ((1, 1), (1, 1)),
    impl: str = "auto",
    dtype=None,
) -> jax.Array:
    """Depthwise k x k conv, explicit zero padding. x: `[B, H, W, C]`, kernel `[k, k, C]`."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    k_h, k_w, channels = kernel.shape
    impl = resolve_depthwise_impl(impl)
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x,
            kernel[:, :, None, :],
            window_strides=(stride, stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )
    if stride == 1 and k_h == k_w and padding == ((k_h // 2,) * 2, (k_w // 2,) * 2):
        return _depthwise_same(x, kernel)
    return _shifted_sum(x, kernel, stride, padding)


def _shifted_sum(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    k_h, k_w, _ = kernel.shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (xp.shape[1] - k_h) // stride + 1
    out_w = (xp.shape[2] - k_w) // stride + 1
    out = None
    for dy in range(k_h):
        for dx in range(k_w):
            window = xp[
                :,
                dy : dy + (out_h - 1) * stride + 1 : stride,
                dx : dx + (out_w - 1) * stride + 1 : stride,
                :,
            ]
            term = window * kernel[dy, dx]
            out = term if out is None else out + term
    return out


@jax.custom_vjp
def _depthwise_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'same' depthwise conv (odd square kernel) with a hand-written backward pass.

    The input gradient is the same shifted sum with the kernel flipped, and the kernel gradient
    k*k products with shifted inputs; autodiff of the slices instead produces k*k padded copies
    and recomputes the forward pass inside them, about 3x slower on XLA:CPU.
    """
    k = kernel.shape[0] // 2
    return _shifted_sum(x, kernel, 1, ((k, k), (k, k)))


def _depthwise_same_fwd(x, kernel):
    return _depthwise_same(x, kernel), (x, kernel)


def _depthwise_same_bwd(residuals, g):
    x, kernel = residuals
    size = kernel.shape[0]
    k = size // 2
    dx = _shifted_sum(g, kernel[::-1, ::-1], 1, ((k, k), (k, k)))
    # dk[dy, dx] = sum x[y + dy - k, x + dx - k] g[y, x] = sum x[y, x] gp[y - dy + 2k, x - dx + 2k]
    # with gp = g zero-padded by k. Two things keep this fast on XLA:CPU:
    # - shifting g rather than x keeps these windows distinct from the forward pass's windows of
    #   x; if they were the same expressions, XLA would share them and materialise all k*k
    #   shifted copies of x (3-4x slower);
    # - each window product is first summed over the batch with explicit adds, an elementwise
    #   loop that reads the window in place, and only the `[H, W, C]` partial sums go to a
    #   reduction. Reducing the window products directly makes XLA copy out each window
    #   first (a slice copy per offset): 2-3x slower (benchmarks/bottleneck_parts.py).
    gp = jnp.pad(g, ((0, 0), (k, k), (k, k), (0, 0)))
    batch, h, w, c = g.shape
    partials = []
    for dy in range(size):
        for dx_ in range(size):
            window = gp[
                :, size - 1 - dy : size - 1 - dy + h, size - 1 - dx_ : size - 1 - dx_ + w, :
            ]
            product = window * x
            for start in range(0, batch, _BATCH_CHUNK):
                acc = product[start]
                for i in range(start + 1, min(batch, start + _BATCH_CHUNK)):
                    acc = acc + product[i]
                partials.append(acc)
    partials = jnp.stack(partials).reshape(size * size, -1, c)
    return dx, jnp.sum(partials, axis=1).reshape(size, size, c).astype(kernel.dtype)


# Images summed per elementwise loop in the depthwise kernel gradient (see above).
_BATCH_CHUNK = 8


_depthwise_same.defvjp(_depthwise_same_fwd, _depthwise_same_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding, dtype=None) -> jax.Array:
    """Dense k x k convolution (the stem). x: `[B, H, W, C_in]`, kernel: `[k, k, C_in, C_out]`."""
    dtype = dtype or x.dtype
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def normal_init(rngs: nnx.Rngs, shape: Sequence[int], std: float) -> jax.Array:
    """N(0, std^2) float32 drawn from the next key of `rngs.params`.

    The key seeds a NumPy generator instead of calling jax.random.normal, which would compile a
    new XLA program for every distinct shape (over 100 for B4: ~15 s of start-up on a CPU).
    """
    seed = np.asarray(jax.random.key_data(rngs.params())).astype(np.uint32)
    values = np.random.default_rng(seed.ravel().tolist()).standard_normal(tuple(shape))
    return jnp.asarray((std * values).astype(np.float32))


class Dense(nnx.Module):
    """A linear map on the last axis (also a 1x1 convolution). kernel `[C_in, C_out]`."""

    def __init__(self, c_in: int, c_out: int, *, use_bias: bool, init_std: float, rngs: nnx.Rngs):
        self.kernel = nnx.Param(normal_init(rngs, (c_in, c_out), init_std))
        self.bias = nnx.Param(jnp.asarray(np.zeros((c_out,), np.float32))) if use_bias else None

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        y = pointwise(x, self.kernel[...], dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class DepthwiseConv(nnx.Module):
    """Depthwise convolution without bias; kernel `[k, k, C]`."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: Padding,
        init_std: float,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(normal_init(rngs, (kernel_size, kernel_size, channels), init_std))
        self.stride = stride
        self.padding = padding
        self.impl = impl

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        return depthwise(x, self.kernel[...], self.stride, self.padding, self.impl, dtype)


class BatchNorm(nnx.Module):
    """Batch norm over `[B, H, W, C]` or `[B, C]` with PyTorch semantics.

    Train mode normalises with the biased batch variance and updates the running variance with
    the unbiased one, as torch.nn.BatchNorm2d does. `group_size` > 0 computes the statistics per
    group of that many consecutive samples ("ghost" batch norm), which reproduces the reference's
    unsynchronised per-GPU statistics (16 images per GPU) on any device layout.
    Statistics are always accumulated in float32.
    """

    def __init__(self, channels: int, *, eps: float, momentum: float = 0.1):
        self.scale = nnx.Param(jnp.asarray(np.ones((channels,), np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.zeros((channels,), np.float32)))
        self.mean = nnx.BatchStat(jnp.asarray(np.zeros((channels,), np.float32)))
        self.var = nnx.BatchStat(jnp.asarray(np.ones((channels,), np.float32)))
        self.eps = eps
        self.momentum = momentum

    def __call__(self, x: jax.Array, *, train: bool = False, group_size: int = 0) -> jax.Array:
        dtype = x.dtype
        if not train:
            inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
            shift = self.bias[...] - self.mean[...] * inv
            return x * inv.astype(dtype) + shift.astype(dtype)
        xf = x.astype(jnp.float32)
        batch, channels = xf.shape[0], xf.shape[-1]
        groups = batch // group_size if group_size and batch % group_size == 0 else 1
        xg = xf.reshape(groups, -1, channels)
        if groups == 1:  # 2-D reductions: a leading unit axis defeats XLA:CPU's parallel loops
            y, mean, var = _batch_norm_train(xg[0], self.scale[...], self.bias[...], self.eps)
            mean, var = mean[None], var[None]
        else:
            y, mean, var = jax.vmap(_batch_norm_train, in_axes=(0, None, None, None))(
                xg, self.scale[...], self.bias[...], self.eps
            )
        count = xg.shape[1]
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * jnp.mean(mean, axis=0)
        self.var[...] = (1 - m) * self.var[...] + m * jnp.mean(unbiased, axis=0)
        return y.reshape(x.shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, eps):
    """Normalise `[N, C]` per channel with the biased variance.

    Returns (y, mean `[C]`, var `[C]`). The hand-written backward pass (two reductions and
    one elementwise pass) runs about 4x faster on XLA:CPU than the one autodiff derives, and BN
    sits three times in every fusion bottleneck.
    """
    return _batch_norm_fwd(x, scale, bias, eps)[0]


def _batch_norm_fwd(x, scale, bias, eps):
    mean = jnp.mean(x, axis=0)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=0)  # two-pass, as torch, for stability
    inv = jax.lax.rsqrt(var + eps)
    x_hat = centered * inv
    return (x_hat * scale + bias, mean, var), (x_hat, inv, scale)


def _batch_norm_bwd(eps, residuals, cotangents):
    del eps
    x_hat, inv, scale = residuals
    g, g_mean, g_var = cotangents
    n = x_hat.shape[0]
    sum_g = jnp.sum(g, axis=0)
    sum_g_xhat = jnp.sum(g * x_hat, axis=0)
    dx = (scale * inv / n) * (n * g - sum_g - x_hat * sum_g_xhat)
    # The statistics are outputs too (for the running averages); their cotangents are zero in
    # training, but stay correct if something differentiates through them.
    dx = dx + g_mean / n + g_var * 2.0 * x_hat / (inv * n)
    return dx, sum_g_xhat, sum_g


_batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def hard_swish(x: jax.Array) -> jax.Array:
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_sigmoid(x: jax.Array) -> jax.Array:
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0
