"""MFCN neck: bring every backbone stage to one stride and concatenate along channels."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from grad_jax.models.grid_ops import resize_align_corners


def mfcn(features: Sequence[jax.Array], strides: Sequence[int], out_stride: int) -> jax.Array:
    """features: `[B, H_i, W_i, C_i]` at `strides`; returns `[B, H, W, sum C_i]` at `out_stride`.

    Coarser maps are upsampled by stride / out_stride with align_corners=True bilinear
    interpolation (torch's UpsamplingBilinear2d), so the output size is the input size times the
    integer factor, and the order of the stages is kept.
    """
    resized = []
    for feature, stride in zip(features, strides, strict=True):
        if stride % out_stride:
            raise ValueError(
                f"stage stride {stride} is not a multiple of the neck's out_stride {out_stride}"
            )
        factor = stride // out_stride
        h, w = feature.shape[1], feature.shape[2]
        resized.append(resize_align_corners(feature, (h * factor, w * factor)))
    shapes = {r.shape[1:3] for r in resized}
    if len(shapes) != 1:
        raise ValueError(f"stages do not meet at one size after resizing: {sorted(shapes)}")
    return jnp.concatenate(resized, axis=-1)
