"""Probing a candidate recipe: its first `selection.probe_epochs` epochs, trained by the training
loop itself (`loop.make_run` and `loop.train_epochs`, the functions of the full run), and scored
as every model kind of `selection.kinds` on the synthetic validation set through the loop's
`on_epoch_end` hook.

So a probe trains with every setting the full run trains with (model, optimiser, schedule, seed,
`model.precision`, the feature cache made by `feature_cache.training_cache`), and its state is
exactly the first epochs of the candidate's full run: the winner's probe is continued, not
repeated. The kNN memory bank the 'knn' and 'grad+knn' kinds read does not depend on the GRAD
training: it is built once per (backbone, size, stages) from the shared feature cache, before
the probe trains (`knn_bank.build_bank`, as the full run builds its own). The hook times the
epochs, validates at `selection.eval_epochs` and the last (one all-kinds predict program), and
stops a probe early when another epoch would end past the probing deadline (`budget`). A probe
keeps no checkpoint: interrupted, the selection starts again on the next run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from grad_jax.config import validate_config
from grad_jax.data import input_pipeline
from grad_jax.inference import device_program
from grad_jax.runs import run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.selection import budget
from grad_jax.selection.candidates import Candidate, competing_kinds
from grad_jax.selection.validation import ValidationSet, validate
from grad_jax.training import feature_cache, knn_bank, loop
from grad_jax.training.run_records import MetricsLog

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Probe:
    """What probing one candidate gave."""

    candidate: Candidate
    record: dict[str, Any]
    state: TrainState | None = None  # host copy of the training state after the probe
    backbone: dict[str, Any] | None = None
    log_path: str = ""
    bank: np.ndarray | None = None  # the kNN memory bank it was scored with (None: no kNN kind)


class SharedFeatures:
    """The feature caches of the training images and the kNN memory banks made from them, one
    per (backbone, size, stages), shared by every candidate's probe; each cache is made by
    `feature_cache.training_cache` and each bank by `knn_bank.build_bank`, as a full run's."""

    def __init__(self):
        self.entries: dict[tuple, tuple[list[np.ndarray], list[str | None]] | None] = {}
        self.banks: dict[tuple, np.ndarray] = {}

    @staticmethod
    def _key(candidate: Candidate) -> tuple:
        return (candidate.backbone, candidate.image_size, candidate.out_layers)

    def get(self, candidate: Candidate, run: loop.TrainingRun):
        """The cache for `candidate` (None when its config does not cache), made once from the
        training images and backbone of `run`."""
        key = self._key(candidate)
        if key not in self.entries:
            self.entries[key] = feature_cache.training_cache(
                run.variables, run.backbone, run.source, run.config, run.mesh
            )
        return self.entries[key]

    def bank(self, candidate: Candidate, run: loop.TrainingRun, cache) -> np.ndarray:
        """The memory bank `[M, C]` of `candidate`'s training patch features, made once from
        its feature `cache` (or, without one, a backbone pass over `run`'s training images)."""
        key = self._key(candidate)
        if key not in self.banks:
            variables = run.variables.replace(backbone=run.backbone)
            features = None if cache is None else cache[0]
            self.banks[key] = knn_bank.build_bank(
                variables, features, run.source, run.config, run.mesh
            )
        return self.banks[key]


class _EpochEnd:
    """A probe's `on_epoch_end`: times its epochs, scores the model as every kind of `kinds`
    (with the memory `bank`) on the validation set at the evaluation epochs, and stops the probe
    when another epoch would end past `deadline`."""

    def __init__(
        self, run: loop.TrainingRun, val: ValidationSet, eval_epochs, deadline,
        kinds=("grad",), bank=None,
    ):  # fmt: skip
        self.run, self.val, self.eval_epochs, self.deadline = run, val, eval_epochs, deadline
        self.kinds, self.bank = tuple(kinds), bank
        self.map_stats: dict[str, dict[str, float]] | None = None  # of the last validation
        self.curve: list[dict[str, Any]] = []
        self.train_seconds = self.val_seconds = 0.0
        self.epochs = 0
        self.stopped = ""  # why the probe stopped before its last epoch
        self.mark = time.time()

    def __call__(self, epochs_done: int, state: TrainState) -> bool:
        self.train_seconds += time.time() - self.mark
        self.epochs = epochs_done
        stop = epochs_done < self.run.config.train.epochs and self._over_budget()
        if epochs_done in self.eval_epochs or stop:
            self._validate(epochs_done, state)
        self.mark = time.time()
        return stop

    def _over_budget(self) -> bool:
        if self.deadline is None:
            return False
        per_epoch = self.train_seconds / self.epochs
        if not budget.agreed(time.time() + per_epoch > self.deadline):
            return False
        self.stopped = (
            f"probing budget: another epoch (about {per_epoch:.0f} s) would end past the time "
            f"that probes may use; stopped after {self.epochs} of "
            f"{self.run.config.train.epochs} epochs"
        )
        log.info("selection %s: %s", self.run.label, self.stopped)
        return True

    def _validate(self, epoch: int, state: TrainState) -> None:
        run = self.run
        variables = run.variables.replace(
            backbone=run.backbone, params=state.params, batch_stats=state.batch_stats,
            bank=self.bank,
        )  # fmt: skip
        # Only the program's per-kind raw maps are read: its own kind is left at GRAD's, which
        # needs neither the bank nor map statistics.
        config = run.config.copy_and_resolve_references()
        config.model.kind = "grad"
        predict = device_program.make_predict_fn(variables, config, run.mesh, all_kinds=True)
        t0 = time.time()
        result = validate(predict, self.val, run.config, self.kinds)
        self.val_seconds = time.time() - t0
        self.map_stats = result["map_stats"]
        self.curve.append({"epoch": epoch, "kinds": result["kinds"]})
        for kind, f in result["kinds"].items():
            log.info(
                "selection %s epoch %d %s: image AUROC %.4f pixel AUROC %.4f AUPRO %.4f",
                run.label, epoch, kind, f["image_auroc"], f["pixel_auroc"], f["pixel_aupro"],
            )  # fmt: skip


def probe(
    candidate: Candidate,
    config: ml_collections.ConfigDict,
    source: input_pipeline.IndexedSource,
    val: ValidationSet,
    shared: SharedFeatures,
    log_dir: str,
    deadline: float | None = None,
) -> Probe:
    """Train `candidate` for `selection.probe_epochs` exactly as its full run would start (the
    training loop, from `shared`'s feature cache), and score it as every kind of
    `selection.kinds` (the kNN kinds with `shared`'s memory bank) on `val` after each epoch of
    `selection.eval_epochs` and the last; stop early (scored there) when another epoch would
    end past `deadline` (a `time.time()`; None: no limit). The step log goes to `log_dir`."""
    t_start = time.time()
    cfg = candidate.apply(config)
    probe_epochs = config.selection.probe_epochs
    cfg.train.epochs = probe_epochs
    validate_config(cfg)
    model = run_folder.create_model(cfg)
    run, state = loop.make_run(cfg, source, model, label=f"probe {candidate.name}")
    os.makedirs(log_dir, exist_ok=True)
    run.metrics_log = MetricsLog(log_dir, 0)
    t_cache = time.time()
    cache = shared.get(candidate, run)
    cache_seconds = time.time() - t_cache
    kinds = competing_kinds(config)
    t_bank = time.time()
    bank = shared.bank(candidate, run, cache) if set(kinds) - {"grad"} else None
    bank_seconds = time.time() - t_bank
    eval_epochs = {e for e in config.selection.eval_epochs if 0 < e < probe_epochs}
    hook = _EpochEnd(run, val, eval_epochs | {probe_epochs}, deadline, kinds, bank)
    state, _ = loop.train_epochs(run, state, 0, cache, on_epoch_end=hook)
    record = _record(candidate, run, hook, cache_seconds, time.time() - t_start, bank_seconds)
    return Probe(
        candidate, record, jax.device_get(state), jax.device_get(run.backbone),
        run.metrics_log.path, bank,
    )  # fmt: skip


def _record(
    candidate, run, hook: _EpochEnd, cache_seconds: float, seconds: float, bank_seconds=0.0
) -> dict:
    """The probe's entry in the selection record: every kind's figures (of the last epoch
    scored) under "kinds", and the map statistics 'grad+knn' was standardised by."""
    last = hook.curve[-1]
    record = {
        "name": candidate.name,
        "backbone": candidate.backbone,
        "image_size": list(candidate.image_size),
        "out_layers": list(candidate.out_layers),
        "probe_epochs": hook.epochs,  # trained: fewer than configured if stopped early
        "curve": hook.curve,
        "kinds": last["kinds"],
        "map_stats": hook.map_stats,
        "seconds_per_epoch": hook.train_seconds / hook.epochs,
        "cache_seconds": cache_seconds,
        "bank_seconds": bank_seconds,
        "val_seconds": hook.val_seconds,
        "seconds": seconds,
        "steps_per_epoch": run.steps_per_epoch,
    }
    if hook.stopped:
        record["stopped_early"] = hook.stopped
    return record
