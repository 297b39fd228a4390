"""The reference's optimiser: a joint global-norm clip, then AdamW per parameter group.

- Clip: PyTorch's clip_grad_norm_(max_norm=0.1) over *all* trained tensors together, scaling by
  max_norm / (norm + 1e-6) when that is below 1 (optax's own clip has no 1e-6).
- Groups: the two grids (lr 0.1) and everything else (lr 1e-3), both AdamW with PyTorch's
  defaults betas (0.9, 0.999), eps 1e-8 and weight decay 0.01 (optax defaults to 1e-4).
- Schedule: StepLR(step_size=40, gamma=0.1) that the reference steps with an explicit epoch
  *after* each epoch, so epoch e (0-based) trains at base * gamma^floor((e - 1) / 40) for e >= 1:
  41 epochs at the base rate, then 9 at a tenth (of 50).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

GRID_KEYS = ("head.local_grid", "head.global_grid")


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def epoch_schedule(base: float, steps_per_epoch: int, step_epochs: int, gamma: float) -> Callable:
    """lr(step) with the reference's one-epoch lag (see module docstring)."""

    def schedule(step):
        epoch = step // steps_per_epoch
        decays = jnp.maximum(epoch - 1, 0) // step_epochs
        return base * gamma ** decays.astype(jnp.float32)

    return schedule


def param_labels(params: Mapping[str, jax.Array]) -> dict[str, str]:
    return {k: ("grid" if k in GRID_KEYS else "net") for k in params}


def make_optimizer(
    train: ml_collections.ConfigDict, steps_per_epoch: int, params: Mapping[str, jax.Array]
) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
    """(transformation, {'grid': schedule, 'net': schedule}) for flat `params`."""
    schedules = {
        group: epoch_schedule(lr, steps_per_epoch, train.lr_step_epochs, train.lr_gamma)
        for group, lr in (("grid", train.grid_lr), ("net", train.net_lr))
    }
    adamw = {
        group: optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train.weight_decay)
        for group, sched in schedules.items()
    }
    tx = optax.chain(
        clip_by_global_norm_torch(train.clip_norm),
        optax.multi_transform(adamw, param_labels(params)),
    )
    return tx, schedules
