"""Probing a candidate: its first `selection.probe_epochs` epochs, trained by the training loop
itself (`loop.make_run` and `loop.train_epochs`, the functions of the full run), and scored on
the synthetic validation set through the loop's `on_epoch_end` hook.

So a probe trains with every setting the full run trains with (model, optimiser, schedule, seed,
`model.precision`, the feature cache made by `feature_cache.training_cache`), and its state is
exactly the first epochs of the candidate's full run: the winner's probe is continued, not
repeated. The hook times the epochs, validates at `selection.eval_epochs` and the last, and
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
from grad_jax.selection.candidates import Candidate
from grad_jax.selection.validation import ValidationSet, validate
from grad_jax.training import feature_cache, loop
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


class SharedFeatures:
    """The feature caches of the training images, one per (backbone, size, stages), shared by
    every candidate's probe; each is made by `feature_cache.training_cache`, as a full run's."""

    def __init__(self):
        self.entries: dict[tuple, tuple[list[np.ndarray], list[str | None]] | None] = {}

    def get(self, candidate: Candidate, run: loop.TrainingRun):
        """The cache for `candidate` (None when its config does not cache), made once from the
        training images and backbone of `run`."""
        key = (candidate.backbone, candidate.image_size, candidate.out_layers)
        if key not in self.entries:
            self.entries[key] = feature_cache.training_cache(
                run.variables, run.backbone, run.source, run.config, run.mesh
            )
        return self.entries[key]


class _EpochEnd:
    """A probe's `on_epoch_end`: times its epochs, scores the model on the validation set at the
    evaluation epochs, and stops the probe when another epoch would end past `deadline`."""

    def __init__(self, run: loop.TrainingRun, val: ValidationSet, eval_epochs, deadline):
        self.run, self.val, self.eval_epochs, self.deadline = run, val, eval_epochs, deadline
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
            backbone=run.backbone, params=state.params, batch_stats=state.batch_stats
        )
        predict = device_program.make_predict_fn(variables, run.config, run.mesh)
        t0 = time.time()
        figures = validate(predict, self.val, run.config)
        self.val_seconds = time.time() - t0
        self.curve.append({"epoch": epoch, **figures})
        log.info(
            "selection %s epoch %d: image AUROC %.4f pixel AUROC %.4f AUPRO %.4f",
            run.label, epoch, figures["image_auroc"], figures["pixel_auroc"],
            figures["pixel_aupro"],
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
    training loop, from `shared`'s feature cache), and score it on `val` after each epoch of
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
    eval_epochs = {e for e in config.selection.eval_epochs if 0 < e < probe_epochs}
    hook = _EpochEnd(run, val, eval_epochs | {probe_epochs}, deadline)
    state, _ = loop.train_epochs(run, state, 0, cache, on_epoch_end=hook)
    record = _record(candidate, run, hook, cache_seconds, time.time() - t_start)
    return Probe(
        candidate, record, jax.device_get(state), jax.device_get(run.backbone),
        run.metrics_log.path,
    )  # fmt: skip


def _record(candidate, run, hook: _EpochEnd, cache_seconds: float, seconds: float) -> dict:
    """The probe's entry in the selection record."""
    last = hook.curve[-1]
    record = {
        "name": candidate.name,
        "backbone": candidate.backbone,
        "image_size": list(candidate.image_size),
        "out_layers": list(candidate.out_layers),
        "probe_epochs": hook.epochs,  # trained: fewer than configured if stopped early
        "curve": hook.curve,
        **{k: last[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")},
        "seconds_per_epoch": hook.train_seconds / hook.epochs,
        "cache_seconds": cache_seconds,
        "val_seconds": hook.val_seconds,
        "seconds": seconds,
        "steps_per_epoch": run.steps_per_epoch,
    }
    if hook.stopped:
        record["stopped_early"] = hook.stopped
    return record
