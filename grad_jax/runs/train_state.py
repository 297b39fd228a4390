"""The training state: one pytree that the jitted step takes and returns and checkpoints hold."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Step counter, trainable parameters, BN statistics and optimiser state.

    Flat string-keyed dicts, as `ModelVariables` has them. The optimiser `tx` is passed to
    `create` and `apply_gradients` rather than stored, so the state is plain data: it is
    replicated, donated, fetched to the host and checkpointed like any pytree.
    """

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: dict[str, jax.Array]
    batch_stats: dict[str, jax.Array]
    opt_state: Any

    @classmethod
    def create(
        cls,
        params: dict[str, jax.Array],
        batch_stats: dict[str, jax.Array],
        tx: optax.GradientTransformation,
    ) -> TrainState:
        """The state at step 0."""
        return cls(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))

    def apply_gradients(
        self,
        grads: dict[str, jax.Array],
        batch_stats: dict[str, jax.Array],
        tx: optax.GradientTransformation,
    ) -> TrainState:
        """One optimiser step: `tx`'s update applied with `optax.apply_updates`, the batch
        statistics of the forward pass kept, the step counted."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
