"""Recipe selection's time budget and its choice: which candidates may still be probed, how many
epochs a candidate's full run can afford, the winning (recipe, model kind) pair, and its
full-run config. The budget is a recipe's: its kinds share its training, so they share its cost.

`selection.budget_minutes` bounds the whole run (final training included); probing may use
`selection.max_share` of it. Decisions that depend on the clock are taken by process 0 and
shared (`agreed`), so every process probes, stops and skips alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from grad_jax.models.knn import KINDS
from grad_jax.selection.candidates import Candidate, from_record, kind_figures

log = logging.getLogger(__name__)

#: A candidate competes only if its full run can train this share of the epochs the config's
#: own recipe could.
ELIGIBLE_SHARE = 0.8


def agreed(flag: bool) -> bool:
    """Process 0's `flag`, on every process (each process's clock differs a little)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def probe_deadline(config: ml_collections.ConfigDict, started: float) -> float | None:
    """The time (`time.time()`) by which probing must end: `selection.max_share` of the budget
    after `started`; None without a budget."""
    budget = config.selection.budget_minutes * 60.0
    return started + config.selection.max_share * budget if budget > 0 else None


def skip_reason(
    candidate: Candidate,
    base_record: dict[str, Any],
    config: ml_collections.ConfigDict,
    started: float,
) -> str | None:
    """Why `candidate` is not probed (its probe, estimated from the config's own recipe's probe
    `base_record` in proportion to the head cost, would end past the probing deadline), or None.
    The config's own recipe is always probed, so this is asked only of the others."""
    deadline = probe_deadline(config, started)
    if deadline is None:
        return None
    base_cost = from_record(base_record).cost(config)
    estimate = base_record["seconds"] * candidate.cost(config) / base_cost
    elapsed = time.time() - started
    if not agreed(started + elapsed + estimate > deadline):
        return None
    return (
        f"over budget: probing would take about {estimate:.0f} s more after {elapsed:.0f} s, "
        f"past the {deadline - started:.0f} s that probes may use"
    )


def _overhead_seconds(record: dict[str, Any]) -> float:
    """Time of a full run besides its epochs: caching the features and building the memory bank
    again, the threshold and the test evaluation (taken as the probe's caching and bank plus two
    epochs and three validations)."""
    per_epoch = record.get("seconds_per_epoch_estimate", record["seconds_per_epoch"])
    return (
        record["cache_seconds"]
        + record.get("bank_seconds", 0.0)
        + 2 * per_epoch
        + 3 * record["val_seconds"]
    )


def affordable_epochs(record: dict[str, Any], config, seconds_left: float) -> int:
    """How many epochs of a candidate's full run fit in `seconds_left` (the configured number at
    most); the probe's epochs (`record["probe_epochs"]`) are already trained and continue."""
    per_epoch = max(record.get("seconds_per_epoch_estimate", record["seconds_per_epoch"]), 1e-9)
    more = int((seconds_left - _overhead_seconds(record)) // per_epoch)
    # Never fewer than the probe's own epochs: with no time left the probe is the model.
    return int(min(config.train.epochs, record["probe_epochs"] + max(more, 0)))


def choose(
    probes: Sequence[Any], config: ml_collections.ConfigDict, seconds_left: float
) -> tuple[Any, str]:
    """The winning (probe, kind) pair among the kinds scored for each of `probes`
    (`probes.Probe`, the config's own recipe first) whose recipe can train long enough; adds
    each recipe's epoch estimate, affordable epochs and eligibility to its record. The best
    figure wins; ties go to the earlier recipe, then to the earlier kind (grad, knn,
    grad+knn)."""
    budget = config.selection.budget_minutes * 60.0
    # On a shared machine the load changes between probes, so each candidate's epoch time is
    # estimated from the fastest measured rate per unit of head cost (positions x channels).
    rate = min(p.record["seconds_per_epoch"] / p.candidate.cost(config) for p in probes)
    for p in probes:
        p.record["seconds_per_epoch_estimate"] = rate * p.candidate.cost(config)
        p.record["affordable_epochs"] = (
            affordable_epochs(p.record, config, seconds_left) if budget > 0 else config.train.epochs
        )
    # A candidate competes only if the budget lets it train (nearly) as long as the config's own
    # recipe could; that one always competes, if need be with fewer epochs than configured.
    floor = ELIGIBLE_SHARE * probes[0].record["affordable_epochs"]
    for i, p in enumerate(probes):
        p.record["fits_budget"] = i == 0 or p.record["affordable_epochs"] >= floor
    pairs = [
        (figures["figure"], -i, -KINDS.index(kind), p, kind)
        for i, p in enumerate(probes)
        if p.record["fits_budget"]
        for kind, figures in kind_figures(p.record).items()
    ]
    best = max(pairs, key=lambda t: t[:3])
    return best[3], best[4]


def final_schedule(config: ml_collections.ConfigDict, winner_record: dict[str, Any]):
    """(epochs, learning-rate step epochs) of the winner's full run: the epochs it can afford
    (at least 1), the step moved in proportion when that is fewer than `train.epochs`."""
    epochs = max(winner_record["affordable_epochs"], 1)
    lr_step = config.train.lr_step_epochs
    if epochs < config.train.epochs:
        lr_step = max(1, round(lr_step * epochs / config.train.epochs))
        log.info("selection: the budget allows %d of %d epochs", epochs, config.train.epochs)
    return epochs, lr_step


def final_config(
    config: ml_collections.ConfigDict, record: dict[str, Any]
) -> ml_collections.ConfigDict:
    """The winner's full-run config: its recipe, its model kind (`model.kind`; a record from
    before kinds competed keeps the config's), and the epochs the budget allows (the learning
    rate step moved in proportion, so the schedule keeps its shape)."""
    chosen = next(c for c in record["candidates"] if c["name"] == record["winner"])
    final = from_record(chosen).apply(config)
    if "winner_kind" in record:
        final.model.kind = record["winner_kind"]
    final.train.epochs = record["final_epochs"]
    final.train.lr_step_epochs = record["final_lr_step_epochs"]
    return final
