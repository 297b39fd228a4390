"""Where a training step's time goes inside the fusion network, on the backend in use.

    python benchmarks/bottleneck_parts.py [--blocks=3] [--batch=8] [--width=432] [--hidden=864]

Defaults are the B4 unified head at 224 px (28 x 28 features, 2C = 432, expansion 864). Prints
one JSON object with milliseconds (median of `--steps` calls, after compiling) for:
- `blocks_train`: forward and backward of `--blocks` fusion bottlenecks in training mode;
- `blocks_products_only`: the same with only the two 1x1 convolutions of each block (what the
  matrix products alone cost; their share of `blocks_train` is `products_share`);
- `depthwise_kernel_grad`: the depthwise kernel gradient as grad_jax computes it, and
  `depthwise_kernel_grad_direct`: the same sums reduced straight from the shifted products,
  the formulation it replaces (XLA:CPU copies out every shifted window first).
Random weights and inputs; nothing here is a unit test.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

flags.DEFINE_integer("blocks", 3, "Fusion bottlenecks in the timed stack.")
flags.DEFINE_integer("batch", 8, "Images per step.")
flags.DEFINE_integer("size", 28, "Feature map height and width.")
flags.DEFINE_integer("width", 432, "Fusion width (2C).")
flags.DEFINE_integer("hidden", 864, "Expansion width (ch_exp).")
flags.DEFINE_integer("steps", 10, "Timed calls.")
FLAGS = flags.FLAGS


def main(argv) -> int:
    del argv
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from grad_jax.benchmark import cpu_info, time_call
    from grad_jax.models import grad_head, layers
    from grad_jax.models.model import merge

    b, s, c, e = FLAGS.batch, FLAGS.size, FLAGS.width, FLAGS.hidden
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, s, s, c)).astype(np.float32))
    cotangent = jnp.asarray(rng.normal(size=(b, s, s, c)).astype(np.float32))
    blocks = nnx.List(
        [
            grad_head.MobileBottleneck(c, e, impl="auto", rngs=nnx.Rngs(i))
            for i in range(FLAGS.blocks)
        ]
    )
    graphdef, params, rest = nnx.split(blocks, nnx.Param, ...)

    def make_loss(products_only: bool):
        def loss(params, rest, x):
            y = x
            for block in merge(graphdef, params, rest):
                if products_only:
                    y = y + block.project(block.expand(y))
                else:
                    y = block(y, train=True, group_size=0)
            return jnp.sum(y * cotangent)

        return jax.jit(jax.value_and_grad(loss))

    def ms(fn, *args) -> float:
        return 1e3 * time_call(lambda: jax.block_until_ready(fn(*args)), FLAGS.steps)

    result = {"backend": jax.default_backend(), "batch": b, "size": s, "width": c, "hidden": e}
    result["blocks"] = FLAGS.blocks
    result["blocks_train"] = ms(make_loss(False), params, rest, x)
    result["blocks_products_only"] = ms(make_loss(True), params, rest, x)
    result["products_share"] = result["blocks_products_only"] / result["blocks_train"]

    h = jnp.asarray(rng.normal(size=(b, s, s, e)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(b, s, s, e)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, e)).astype(np.float32))

    def direct(h, g):
        hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        sums = [
            jnp.sum(hp[:, dy : dy + s, dx : dx + s, :] * g, axis=(0, 1, 2))
            for dy in range(3)
            for dx in range(3)
        ]
        return jnp.stack(sums).reshape(3, 3, e)

    ours = jax.jit(lambda h, g: layers._depthwise_same_bwd((h, kernel), g)[1])
    direct = jax.jit(direct)
    np.testing.assert_allclose(ours(h, g), direct(h, g), rtol=1e-3, atol=1e-2 * np.sqrt(b * s * s))
    result["depthwise_kernel_grad"] = ms(ours, h, g)
    result["depthwise_kernel_grad_direct"] = ms(direct, h, g)
    result.update(cpu_info())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    app.run(main)
