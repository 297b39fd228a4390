"""EfficientNet-B0..B7 (lukemelas `efficientnet_pytorch` layout) and EfficientNet-Lite0..4, NHWC.

The network returns the outputs of the blocks that end the requested stages ("layers" 1..5, at
strides 2, 4, 8, 16, 32) and computes nothing after the last of them: CRAD only reads layers 3
and 4, so B4's blocks 22-31, conv head and classifier are never run.

Every convolution is padded statically with the TF-"SAME" amounts computed for the variant's
*nominal* image size (380 px for B4), exactly as the PyTorch code that produced the pretrained
weights does. At another input size this differs from padding='SAME' (for B4 at 224 px, block 6
pads (2, 2) where 'SAME' would pad (1, 2)), so the pads follow the nominal schedule to keep the
features the reference sees.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from grad_jax.models import layers

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of the seven stages.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# name: (width, depth, nominal resolution)
_VARIANTS = {
    "efficientnet-b0": (1.0, 1.0, 224),
    "efficientnet-b1": (1.0, 1.1, 240),
    "efficientnet-b2": (1.1, 1.2, 260),
    "efficientnet-b3": (1.2, 1.4, 300),
    "efficientnet-b4": (1.4, 1.8, 380),
    "efficientnet-b5": (1.6, 2.2, 456),
    "efficientnet-b6": (1.8, 2.6, 528),
    "efficientnet-b7": (2.0, 3.1, 600),
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
    "efficientnet-lite3": (1.2, 1.4, 280),
    "efficientnet-lite4": (1.4, 1.8, 300),
}
VARIANTS = tuple(_VARIANTS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    in_ch: int
    out_ch: int
    expand_ratio: int
    kernel: int
    stride: int
    pad: layers.Padding
    se_ch: int  # 0 = no squeeze-excitation
    in_size: int  # nominal spatial size entering the block
    out_size: int

    @property
    def hidden(self) -> int:
        return self.in_ch * self.expand_ratio

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


@dataclasses.dataclass(frozen=True)
class EfficientNetSpec:
    name: str
    lite: bool
    stem_ch: int
    stem_pad: layers.Padding
    blocks: tuple[BlockSpec, ...]
    nominal_size: int
    bn_eps: float = 1e-3

    def layer_blocks(self) -> dict[int, int]:
        """Layer (1..5) -> index of the block that ends it (the last block at stride 2**layer)."""
        ends: dict[int, int] = {}
        stride = 2
        for i, block in enumerate(self.blocks):
            stride *= block.stride
            ends[int(math.log2(stride))] = i
        return ends

    def layer_channels(self, layer: int) -> int:
        return self.blocks[self.layer_blocks()[layer]].out_ch

    def output_size(self, image_hw: tuple[int, int], block: int) -> tuple[int, int]:
        """Actual `(h, w)` after `block` for an input of `image_hw` (static pads, any size)."""

        def conv(n: int, k: int, s: int, pad: tuple[int, int]) -> int:
            return (n + pad[0] + pad[1] - k) // s + 1

        h, w = (conv(n, 3, 2, self.stem_pad[0]) for n in image_hw)
        for b in self.blocks[: block + 1]:
            h, w = conv(h, b.kernel, b.stride, b.pad[0]), conv(w, b.kernel, b.stride, b.pad[1])
        return h, w

    @property
    def normalize(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) applied to 0..255 RGB: Lite takes (x - 127) / 128, B-series ImageNet."""
        if self.lite:
            return (127.0,) * 3, (128.0,) * 3
        return tuple(255.0 * m for m in IMAGENET_MEAN), tuple(255.0 * s for s in IMAGENET_STD)


def _round_filters(filters: int, width: float) -> int:
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    if rounded < 0.9 * scaled:
        rounded += 8
    return int(rounded)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


def efficientnet_spec(name: str) -> EfficientNetSpec:
    """The architecture of a named variant, with static pads for its nominal resolution."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(VARIANTS)}")
    width, depth, size = _VARIANTS[name]
    lite = "lite" in name
    # Lite keeps the stem and the first/last stages unscaled (TF-Lite "fix_head_stem").
    stem_ch = 32 if lite else _round_filters(32, width)
    stem_pad, size = _same_pad(size, 3, 2)
    blocks = []
    last = len(_STAGES) - 1
    for s, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_STAGES):
        c_in = _round_filters(c_in, width)
        c_out = _round_filters(c_out, width)
        if lite and s in (0, last):
            n = repeats
            if s == 0:
                c_in = 32
        else:
            n = int(math.ceil(depth * repeats))
        for r in range(n):
            block_in = c_in if r == 0 else c_out
            block_stride = stride if r == 0 else 1
            pad, out_size = _same_pad(size, kernel, block_stride)
            se_ch = 0 if lite else max(1, int(block_in * 0.25))
            blocks.append(
                BlockSpec(
                    block_in, c_out, expand, kernel, block_stride, (pad, pad), se_ch, size, out_size
                )
            )
            size = out_size
    return EfficientNetSpec(
        name, lite, stem_ch, (stem_pad, stem_pad), tuple(blocks), _VARIANTS[name][2]
    )


class MBConv(nnx.Module):
    """Mobile inverted bottleneck: [expand 1x1] -> depthwise -> [SE] -> project 1x1 (+ skip)."""

    def __init__(self, spec: BlockSpec, *, lite: bool, eps: float, impl: str, rngs: nnx.Rngs):
        self.spec = spec
        self.lite = lite
        hidden = spec.hidden
        if spec.expand_ratio != 1:
            self.expand = layers.Dense(spec.in_ch, hidden, use_bias=False, init_std=0.1, rngs=rngs)
            self.expand_bn = layers.BatchNorm(hidden, eps=eps)
        else:
            self.expand = self.expand_bn = None
        self.depthwise = layers.DepthwiseConv(
            hidden,
            spec.kernel,
            stride=spec.stride,
            padding=spec.pad,
            init_std=0.1,
            impl=impl,
            rngs=rngs,
        )
        self.depthwise_bn = layers.BatchNorm(hidden, eps=eps)
        if spec.se_ch:
            self.se_reduce = layers.Dense(
                hidden, spec.se_ch, use_bias=True, init_std=0.1, rngs=rngs
            )
            self.se_expand = layers.Dense(
                spec.se_ch, hidden, use_bias=True, init_std=0.1, rngs=rngs
            )
        else:
            self.se_reduce = self.se_expand = None
        self.project = layers.Dense(hidden, spec.out_ch, use_bias=False, init_std=0.1, rngs=rngs)
        self.project_bn = layers.BatchNorm(spec.out_ch, eps=eps)

    def _act(self, x: jax.Array) -> jax.Array:
        return jnp.clip(x, 0.0, 6.0) if self.lite else jax.nn.silu(x)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = inputs
        if self.expand is not None:
            x = self._act(self.expand_bn(self.expand(x)))
        x = self._act(self.depthwise_bn(self.depthwise(x)))
        if self.se_reduce is not None:
            squeezed = jnp.mean(x, axis=(1, 2))
            gate = self.se_expand(jax.nn.silu(self.se_reduce(squeezed)))
            x = x * jax.nn.sigmoid(gate)[:, None, None, :]
        x = self.project_bn(self.project(x))
        if self.spec.residual:
            x = x + inputs
        return x


class EfficientNet(nnx.Module):
    """A frozen feature extractor (eval-mode BN, no drop-connect).

    __call__ takes uint8-range RGB `[B, H, W, 3]` (any float or int dtype, values 0..255), applies
    the variant's normalisation, and returns the outputs of `out_layers`, each `[B, h, w, c]`.
    """

    def __init__(
        self,
        name: str,
        out_layers: tuple[int, ...],
        *,
        dtype=jnp.float32,
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        spec = efficientnet_spec(name)
        ends = spec.layer_blocks()
        bad = [layer for layer in out_layers if layer not in ends]
        if bad:
            raise ValueError(f"out_layers {bad} not in {sorted(ends)} for {name}")
        self.spec = spec
        self.out_blocks = tuple(ends[layer] for layer in out_layers)
        self.out_strides = tuple(2**layer for layer in out_layers)
        self.out_channels = tuple(spec.blocks[b].out_ch for b in self.out_blocks)
        self.dtype = dtype
        self.stem = nnx.Param(layers.normal_init(rngs, (3, 3, 3, spec.stem_ch), 0.1))
        self.stem_bn = layers.BatchNorm(spec.stem_ch, eps=spec.bn_eps)
        last = max(self.out_blocks)
        self.blocks = nnx.List(
            [
                MBConv(b, lite=spec.lite, eps=spec.bn_eps, impl=depthwise_impl, rngs=rngs)
                for b in spec.blocks[: last + 1]
            ]
        )

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        mean, std = self.spec.normalize
        x = (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)
        x = x.astype(self.dtype)
        x = layers.conv2d(x, self.stem[...], 2, self.spec.stem_pad, self.dtype)
        x = self.stem_bn(x)
        x = jnp.clip(x, 0.0, 6.0) if self.spec.lite else jax.nn.silu(x)
        outputs = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_blocks:
                outputs[i] = x
        return [outputs[b] for b in self.out_blocks]
