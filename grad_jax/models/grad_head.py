"""The CRAD reconstruction head: continuous grids, coordinate networks, fusion and refinement.

Input x `[B, H, W, C]` (the neck output). A global coordinate per image reads a `[G, G, H, W, C]`
grid of whole feature maps; a local coordinate per pixel reads a `[g, g, C]` grid of feature
vectors. Eleven MobileNetV3 bottlenecks fuse the two reads, a 1x1 conv recovers C channels, and a
similarity gate blends the reconstruction with the input. Widths follow the backbone: the fusion
runs at 2C channels (the reference hard-codes 432 = 2 * 216 for B4) and expands to `ch_exp`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grad_jax.models import grid_ops, layers

# The reference initialises every conv/linear weight N(0, 0.01^2) and zeroes biases.
INIT_STD = 0.01


class HeadConfig(NamedTuple):
    channels: int  # C, from the backbone
    feature_hw: tuple[int, int]  # (H, W) of x
    local_resol: int = 8
    global_resol: int = 4
    layers: int = 11
    ch_exp: int = 864
    mse_lamb: float = 0.3
    cos_lamb: float = 0.7
    mse_coef: float = 0.05
    noise_std: float = 0.05
    noise_prob: float = 0.5
    upsample: int = 8  # anomaly map upsampling factor (the neck's out_stride)
    bn_group_size: int = 0  # 0: statistics over the whole batch
    dtype: str = "float32"
    depthwise_impl: str = "auto"


class HeadOutputs(NamedTuple):
    feature_align: jax.Array  # x, [B, H, W, C]
    reconstruction: jax.Array  # r, before refinement, [B, H, W, C]
    feature_rec: jax.Array  # refined x_hat = s x + (1 - s) r, [B, H, W, C]
    similarity: jax.Array  # s, [B, H, W]
    distance: jax.Array  # ||x_hat - x|| over channels, [B, H, W]
    anomaly_map: jax.Array  # distance upsampled with align_corners=True, [B, H*u, W*u]
    global_coord: jax.Array  # [B, 2] as (x, y)
    local_coord: jax.Array  # [B, H, W, 2] as (x, y), after jitter


def _xavier_normal_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


class MobileBottleneck(nnx.Module):
    """1x1 expand, BN, h-swish, 3x3 depthwise, BN, SE, h-swish, 1x1 project, BN, residual.

    SE sits before the second h-swish: that is the reference's order (not the MobileNetV3 paper's)
    and the pretrained CRAD checkpoints depend on it.
    """

    def __init__(self, width: int, hidden: int, *, impl: str, rngs: nnx.Rngs):
        std = INIT_STD
        self.expand = layers.Dense(width, hidden, use_bias=False, init_std=std, rngs=rngs)
        self.expand_bn = layers.BatchNorm(hidden, eps=1e-5)
        self.depthwise = layers.DepthwiseConv(
            hidden, 3, padding=((1, 1), (1, 1)), init_std=std, impl=impl, rngs=rngs
        )
        self.depthwise_bn = layers.BatchNorm(hidden, eps=1e-5)
        self.se_reduce = layers.Dense(hidden, hidden // 4, use_bias=False, init_std=std, rngs=rngs)
        self.se_expand = layers.Dense(hidden // 4, hidden, use_bias=False, init_std=std, rngs=rngs)
        self.project = layers.Dense(hidden, width, use_bias=False, init_std=std, rngs=rngs)
        self.project_bn = layers.BatchNorm(width, eps=1e-5)

    def __call__(self, inputs: jax.Array, *, train: bool, group_size: int) -> jax.Array:
        bn = dict(train=train, group_size=group_size)
        x = layers.hard_swish(self.expand_bn(self.expand(inputs), **bn))
        x = self.depthwise_bn(self.depthwise(x), **bn)
        squeezed = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        gate = layers.hard_sigmoid(self.se_expand(jax.nn.relu(self.se_reduce(squeezed))))
        x = layers.hard_swish(x * gate[:, None, None, :])
        x = self.project_bn(self.project(x), **bn)
        return inputs + x


class GradHead(nnx.Module):
    def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.channels
        h, w = cfg.feature_hw
        g, gg = cfg.local_resol, cfg.global_resol
        # PyTorch's xavier_normal_ on the reference's 4-D tensors (1, C, g, g) and
        # (1, C*H*W, G, G): fan_in = dim1 * receptive field, fan_out = dim0 * receptive field.
        local_std = _xavier_normal_std(c * g * g, g * g)
        global_std = _xavier_normal_std(c * h * w * gg * gg, gg * gg)
        self.local_grid = nnx.Param(layers.normal_init(rngs, (g, g, c), local_std))
        self.global_grid = nnx.Param(layers.normal_init(rngs, (gg, gg, h, w, c), global_std))
        std = INIT_STD
        self.global_fc1 = layers.Dense(c, c, use_bias=True, init_std=std, rngs=rngs)
        self.global_fc2 = layers.Dense(c, 2, use_bias=True, init_std=std, rngs=rngs)
        self.local_fc1 = layers.Dense(c, c, use_bias=True, init_std=std, rngs=rngs)
        self.local_fc2 = layers.Dense(c, 2, use_bias=True, init_std=std, rngs=rngs)
        self.bottlenecks = nnx.List(
            [
                MobileBottleneck(2 * c, cfg.ch_exp, impl=cfg.depthwise_impl, rngs=rngs)
                for _ in range(cfg.layers)
            ]
        )
        self.recover = layers.Dense(2 * c, c, use_bias=False, init_std=std, rngs=rngs)

    def coordinates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Global `[B, 2]` and local `[B, H, W, 2]` coordinates in (-1, 1), float32."""
        xf = x.astype(jnp.float32)
        pooled = jnp.mean(xf, axis=(1, 2))
        v_global = jnp.tanh(self.global_fc2(jnp.tanh(self.global_fc1(pooled))))
        v_local = jnp.tanh(self.local_fc2(jnp.tanh(self.local_fc1(xf))))
        return v_global, v_local

    def __call__(
        self, x: jax.Array, *, train: bool = False, noise_key: jax.Array | None = None
    ) -> HeadOutputs:
        """x: `[B, H, W, C]` float. `noise_key` drives the training-time coordinate jitter."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, h, w, c = x.shape
        if (h, w) != tuple(cfg.feature_hw) or c != cfg.channels:
            raise ValueError(
                f"head built for features {tuple(cfg.feature_hw)}x{cfg.channels}, got {h}x{w}x{c}"
            )
        v_global, v_local = self.coordinates(x)
        if train and noise_key is not None and cfg.noise_std > 0:
            # One coin per step for the whole batch, as the reference draws one per forward pass.
            coin_key, noise_key = jax.random.split(noise_key)
            jitter = jax.random.uniform(coin_key) < cfg.noise_prob
            noise = cfg.noise_std * jax.random.normal(noise_key, v_local.shape, v_local.dtype)
            v_local = v_local + jnp.where(jitter, noise, 0.0)

        global_grid = self.global_grid[...]
        gg = global_grid.shape[0]
        f_global = grid_ops.lookup_points(global_grid.reshape(gg, gg, h * w * c), v_global)
        f_global = f_global.reshape(b, h, w, c)
        f_local = grid_ops.lookup_batch(self.local_grid[...], v_local.reshape(b, h * w, 2))
        f_local = f_local.reshape(b, h, w, c)

        q = jnp.concatenate([f_global, f_local], axis=-1).astype(dtype)
        for block in self.bottlenecks:
            q = block(q, train=train, group_size=cfg.bn_group_size)
        r = self.recover(q).astype(jnp.float32)
        return refine(x.astype(jnp.float32), r, cfg, v_global, v_local)


def refine(
    x: jax.Array, r: jax.Array, cfg: HeadConfig, v_global: jax.Array, v_local: jax.Array
) -> HeadOutputs:
    """Similarity blend and anomaly map, in float32 (they decide the scores)."""
    sq_err = jnp.mean(jnp.square(r - x), axis=-1)
    # Hard gate: 1 where the mean squared error is <= 1/mse_coef (round is half-to-even as in
    # torch). It has zero gradient in the reference; stop_gradient says so explicitly.
    gate = jax.lax.stop_gradient(1.0 - jnp.round(jnp.clip(sq_err * cfg.mse_coef, 0.0, 1.0)))
    r_unit = r / _clamped_norm(r)
    x_unit = x / _clamped_norm(x)
    cos = jnp.sum(r_unit * x_unit, axis=-1)
    s = cfg.mse_lamb * gate + cfg.cos_lamb * cos
    x_hat = s[..., None] * x + (1.0 - s[..., None]) * r
    distance = jnp.sqrt(jnp.sum(jnp.square(x_hat - x), axis=-1))
    h, w = distance.shape[1:]
    anomaly_map = grid_ops.resize_align_corners(distance, (h * cfg.upsample, w * cfg.upsample))
    return HeadOutputs(x, r, x_hat, s, distance, anomaly_map, v_global, v_local)


def _clamped_norm(v: jax.Array, eps: float = 1e-8) -> jax.Array:
    # torch.cosine_similarity divides each vector by max(||v||, eps) separately. Clamping the
    # squared norm gives the same values and keeps the gradient finite at v = 0.
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=-1, keepdims=True), eps * eps))


def feature_loss(out: HeadOutputs) -> jax.Array:
    """The reference's FeatureMSELoss: mean over all B*H*W*C elements of (x_hat - x)^2."""
    return jnp.mean(jnp.square(out.feature_rec - out.feature_align))
