"""The precision of float32 matrix products and convolutions on accelerators.

XLA's default on GPUs multiplies float32 operands as TensorFloat-32 (10-bit mantissa) on Ampere
and later, and on TPUs as a single bfloat16 pass. `config.model.precision` chooses instead:

- 'float32': full float32 products (slowest; 6 bfloat16 passes on TPU);
- 'tensorfloat32': TF32 on GPUs, 3 bfloat16 passes on TPU (close to float32);
- 'bfloat16': one bfloat16 pass (fastest, least accurate);
- 'default': whatever the backend does by default.

The setting is applied around every call of the jitted training, feature and prediction
functions (it is part of JAX's compilation cache key), so it never leaks into other code.
CPUs compute float32 products in float32 whatever the setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PRECISIONS = ("default", "bfloat16", "tensorfloat32", "float32")


def with_precision(fn: Callable[..., Any], precision: str) -> Callable[..., Any]:
    """`fn` (a jitted function) called under `jax.default_matmul_precision(precision)`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")

    def call(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):  # for cost analysis and export, under the same setting
        with jax.default_matmul_precision(precision):
            return fn.lower(*args, **kwargs)

    call.lower = lower
    return call
