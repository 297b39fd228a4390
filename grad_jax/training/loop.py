"""The training loop (`train_epochs`), and `train_and_evaluate(config, workdir)`: the loop, then
calibration and evaluation.

The trainable state (`TrainState`: head params, BN statistics, optimiser state, step) is separate
from the frozen backbone, which is passed to the step as a constant. The step is `jax.jit` with
`in_shardings` / `out_shardings` over a `Mesh` with a `data` axis (pjit-style), with the state
donated. Around the loop: the feature cache (`feature_cache`), the metrics log and the stop
request (`run_records`), checkpoints (`checkpointing`), and, with the final model, the decision
threshold and class centres (`calibration`) and the test evaluation (`evaluate`).

`make_run` and `train_epochs` are the only way a model is trained: the full run and recipe
selection's probes (`grad_jax.selection.probes`, through the `on_epoch_end` hook) both use them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import auto as tqdm

from grad_jax.config import validate_config
from grad_jax.data import input_pipeline
from grad_jax.devices import sharding
from grad_jax.devices.precision import with_precision
from grad_jax.errors import ConfigError, Interrupted
from grad_jax.evaluation import evaluate
from grad_jax.inference import device_program
from grad_jax.models.grad_head import feature_loss
from grad_jax.models.model import ModelVariables, build_model, split_model, to_flat
from grad_jax.runs import checkpointing, run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.training import calibration, feature_cache, knn_bank
from grad_jax.training.optim import make_optimizer
from grad_jax.training.run_records import MetricsLog, StopFlag

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The jitted step
# ---------------------------------------------------------------------------------------------


def make_train_step(
    variables: ModelVariables,
    tx: optax.GradientTransformation,
    mesh,
    from_features: bool,
    seed: int,
    precision: str = "default",
) -> Callable:
    """step(state, backbone, batch) -> (state, metrics). Batch: 'image' or 'feature_<i>', and
    optionally 'stop' (see `step_inputs`)."""
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    base_key = jax.random.key(seed)

    def step(state: TrainState, backbone, batch):
        noise_key = jax.random.fold_in(base_key, state.step)

        def loss_fn(params):
            model = variables.merge(backbone, params, state.batch_stats)
            if from_features:
                feats = [batch[f"feature_{i}"] for i in range(len(model.backbone.out_blocks))]
                out = model.from_features(feats, train=True, noise_key=noise_key)
            else:
                out = model(batch["image"], train=True, noise_key=noise_key)
            new_stats = to_flat(split_model(model)[3])
            return feature_loss(out), new_stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, stats, tx)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # Every process's stop request rides with its rows of the batch: the maximum is the
        # same on all processes, so they all stop after the same step (see `_stop_agreed`).
        stop = jnp.max(batch["stop"]) if "stop" in batch else jnp.zeros((), jnp.int32)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "stop": stop}

    jitted = jax.jit(
        step,
        in_shardings=(rep, rep, data),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    return with_precision(jitted, precision)


def step_inputs(local: dict[str, Any], stop: bool | None = None) -> dict[str, np.ndarray]:
    """What the step reads from this process's rows of a batch: the images (or cached
    features), and with `stop` given, each row's stop request."""
    inputs = {k: v for k, v in local.items() if k == "image" or k.startswith("feature_")}
    if stop is not None:
        inputs["stop"] = np.full((len(local["filename"]),), int(stop), np.int32)
    return inputs


def epoch_batches(
    source, epoch: int, skip: int, config: ml_collections.ConfigDict, cache=None
) -> Iterator[dict[str, Any]]:
    """This process's rows of every global batch of `epoch` after the first `skip` images
    (a resumed epoch), decoded from `source` or read from the feature `cache`."""
    batch = config.train.batch_size
    order = input_pipeline.epoch_order(len(source), config.seed, epoch, batch, jax.device_count())
    order = order[skip:]
    if cache is not None:
        features, names = cache
        return feature_cache.cached_batches(features, names, order, batch, source)
    return input_pipeline.batches(source, order, batch, workers=config.data.num_workers)


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingRun:
    """What the training loop needs and keeps for the whole run."""

    config: ml_collections.ConfigDict
    variables: ModelVariables
    tx: optax.GradientTransformation
    schedules: dict[str, Callable[[int], Any]]
    mesh: Any
    backbone: Any  # replicated on the mesh
    source: Any  # IndexedSource or TiledSource of the training images
    steps_per_epoch: int
    checkpoints: checkpointing.Checkpoints | None  # None: a probe, which saves nothing
    run_values: dict[str, Any]  # the trajectory settings a resume must agree on
    metrics_log: MetricsLog | None = None
    label: str = ""  # names the run in progress bars and messages (e.g. a probe's candidate)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.train.epochs

    def save(
        self, step: int, state: TrainState, final: bool = False, extra=None, bank=None
    ) -> None:
        record = {
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "final": final,
            "run": self.run_values,
            **(extra or {}),
        }
        self.checkpoints.save(step, state, self.backbone, self.config, record, bank)

    def record_step(self, pending: tuple) -> None:
        """Check and log a finished step: `(step, metrics, filenames, images per second)`."""
        step, step_metrics, filenames, rate = pending
        self.metrics_log.record_step(
            step, step_metrics, filenames, rate, self.schedules, self.steps_per_epoch,
            self.config.train.log_every_steps,
        )  # fmt: skip


def _open_data(config: ml_collections.ConfigDict):
    """(categories, training source, held-out items); resolves `data.image_size` in `config`."""
    categories = input_pipeline.open_categories(config)
    with config.ignore_type():  # 'auto' becomes the chosen (height, width), kept in config.json
        config.data.image_size = input_pipeline.resolve_image_size(config, categories)
    names = [c.name for c in categories]
    train_items, held_items = input_pipeline.split_holdout(
        categories, config.threshold.holdout_fraction, config.seed
    )
    sources = [c.train for c in categories]
    train_source = input_pipeline.training_source(config, sources, train_items, names)
    if len(train_source) == 0:
        raise ConfigError(
            "no training images left after holding out threshold.holdout_fraction of them"
        )
    return categories, train_source, held_items


def make_run(
    config: ml_collections.ConfigDict,
    source,
    model,
    checkpoints: checkpointing.Checkpoints | None = None,
    run_values: dict[str, Any] | None = None,
    label: str = "",
) -> tuple[TrainingRun, TrainState]:
    """The run of `config` on the training images of `source`, starting from `model` (a
    `GradModel`), and its initial state (step 0, on the host): the one place a run's optimiser,
    schedules, mesh and step count are made, for a full run and a probe alike."""
    spe = input_pipeline.steps_per_epoch(len(source), config.train.batch_size, jax.device_count())
    variables = ModelVariables.from_model(model)
    tx, schedules = make_optimizer(config.train, spe, variables.params)
    state = TrainState.create(variables.params, variables.batch_stats, tx)
    mesh = sharding.make_mesh()
    backbone = sharding.replicate(variables.backbone, mesh)
    run = TrainingRun(
        config, variables, tx, schedules, mesh, backbone, source, spe, checkpoints,
        run_values or {}, label=label,
    )  # fmt: skip
    return run, state


def _start_or_resume(config, workdir: str, train_source) -> tuple[TrainingRun, TrainState, dict]:
    """The run and its state: new (pretrained backbone), or from the latest checkpoint (which
    holds the backbone). Returns (run, state on the host, the checkpoint's meta)."""
    ckpt = checkpointing.Checkpoints(workdir, config.train.keep_checkpoints)
    resuming = ckpt.latest_step() is not None
    run_values = {
        **checkpointing.fingerprint(config, checkpointing.RESUME_FIELDS),
        "train_images": len(train_source),
    }
    model = build_model(config, config.seed) if resuming else run_folder.create_model(config)
    run, state = make_run(config, train_source, model, ckpt, run_values)
    meta = {}
    if resuming:
        step, state, backbone, meta = ckpt.restore_training(state, run.variables.backbone, config)
        checkpointing.check_resume(meta.get("run"), run_values, workdir)
        log.info("resuming from step %d (%s)", step, ckpt.directory)
        run.variables = run.variables.replace(backbone=backbone)
        run.backbone = sharding.replicate(backbone, run.mesh)
    if jax.process_index() == 0:
        # Only now: a run restarted with an incompatible config has been refused above and
        # must not overwrite the config its checkpoints belong to.
        run_folder.write_config(config, workdir)
    return run, state, meta


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, extra_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train (resuming from the latest checkpoint), set the threshold, evaluate, report.

    `extra_info` (e.g. the recipe selection's record) is added to metrics.json.
    """
    sharding.maybe_initialize_distributed()
    config = config.copy_and_resolve_references()  # never mutate the caller's config
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    categories, train_source, held_items = _open_data(config)
    run, state, meta = _start_or_resume(config, workdir, train_source)
    start_step = int(state.step)
    done = bool(meta.get("final")) and start_step >= run.total_steps
    run.metrics_log = MetricsLog(workdir, start_step)
    cache, stopped = None, False
    if not done:
        cache = feature_cache.training_cache(
            run.variables, run.backbone, run.source, config, run.mesh
        )
        state, stopped = train_epochs(run, state, start_step, cache)
    else:
        state = sharding.replicate(state, run.mesh)

    final = run.variables.replace(
        backbone=run.backbone, params=state.params, batch_stats=state.batch_stats
    )
    if knn_bank.enabled(config):  # the nearest-neighbour baseline's memory bank
        if done:
            bank = run.checkpoints.restore_bank(run.total_steps)
        else:
            features = None if cache is None else cache[0]
            bank = knn_bank.build_bank(final, features, run.source, config, run.mesh)
        final = final.replace(bank=bank)
    if not done:
        meta = _calibrate_and_save(run, state, final, categories, held_items, cache)
    run.checkpoints.close()
    if stopped:
        raise Interrupted(
            f"stopped after the last step; training is complete and saved (step "
            f"{run.total_steps}). Run the same command again to evaluate."
        )
    stats = device_program.map_stats(meta)
    predict = device_program.make_predict_fn(final, config, run.mesh, stats, all_kinds=True)
    results = evaluate.evaluate_categories(predict, categories, config, stats)
    info = {
        "model": f"final (epoch {config.train.epochs}), not selected on the test set",
        **evaluate.decision_info(meta, config),
        "step": run.total_steps,
        **(extra_info or {}),
    }
    return evaluate.publish(workdir, results, info, meta.get("class_centres"))


def _calibrate_and_save(run, state, final, categories, held_items, cache) -> dict:
    """The decision thresholds and map statistics of every model kind and the class centres of
    the final model, saved with it (and its kNN memory bank) as the final checkpoint; returns
    that checkpoint's meta."""
    config = run.config
    predict = device_program.make_predict_fn(final, config, run.mesh, all_kinds=True)
    calibrated = calibration.calibrate_kinds(predict, categories, held_items, config)
    meta = {
        "threshold": calibrated["threshold"],
        "kinds": calibrated["kinds"],
        "class_centres": calibration.class_centres(
            final, None if cache is None else cache[0], run.source, config, run.mesh
        ),
        "categories": [c.name for c in categories],
    }
    if final.bank is not None:
        meta["knn"] = {
            "map_stats": calibrated["map_stats"],
            "fraction": config.knn.fraction,
            "patch_size": config.knn.patch_size,
        }
    if run.total_steps in run.checkpoints.steps():
        # A non-final save of the last step (an interrupt there, by an older version): the
        # state is the one just restored from it, so replacing it loses nothing.
        run.checkpoints.delete(run.total_steps)
    run.save(run.total_steps, state, final=True, extra=meta, bank=final.bank)
    return meta


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

#: `on_epoch_end(epochs_done, state)`, called by `train_epochs` after each epoch (and its
#: checkpoint); True asks the loop to stop there.
EpochHook = Callable[[int, TrainState], bool]


def train_epochs(
    run: TrainingRun,
    state: TrainState,
    start_step: int,
    cache: tuple[list[np.ndarray], list[str | None]] | None = None,
    on_epoch_end: EpochHook | None = None,
) -> tuple[TrainState, bool]:
    """Train `run` from `start_step` to the end of its `train.epochs`: the one training loop,
    for a full run and for a recipe-selection probe alike.

    The step is built here, from `run` (model, optimiser, seed, `model.precision`) and whether
    `cache` (backbone features from `feature_cache.training_cache`) is given, so no training
    setting can reach one caller and not the other. With `run.checkpoints`, a checkpoint is
    saved every `train.checkpoint_every_epochs` epochs (not after the last one: the caller
    saves the final state). SIGINT/SIGTERM: a stop before the last step saves a checkpoint and
    raises Interrupted; at the last step the run is complete and the stop is returned. A run
    without checkpoints (a probe) raises Interrupted at any step. `on_epoch_end` runs after each
    epoch and may end the loop there (the state of that epoch is returned).

    Returns (state, whether a stop was asked at the last step).
    """
    config = run.config
    step_fn = make_train_step(
        run.variables, run.tx, run.mesh, cache is not None, config.seed, config.model.precision
    )
    state = sharding.replicate(state, run.mesh)
    step, stopped = start_step, False
    with StopFlag() as stop:
        for epoch in range(start_step // run.steps_per_epoch, config.train.epochs):
            state, step, stop_at_end = _train_epoch(run, state, step_fn, step, epoch, cache, stop)
            stopped = stopped or stop_at_end
            if _checkpoint_due(run, epoch + 1):
                run.save(step, state)
            if on_epoch_end is not None and on_epoch_end(epoch + 1, state):
                break
    return state, stopped


def _checkpoint_due(run: TrainingRun, epochs_done: int) -> bool:
    """Whether the loop saves after `epochs_done` epochs: every `train.checkpoint_every_epochs`
    but the last (the caller saves the final state), and never in a run without checkpoints."""
    every = run.config.train.checkpoint_every_epochs
    last = epochs_done == run.config.train.epochs
    return run.checkpoints is not None and not last and every > 0 and epochs_done % every == 0


def _train_epoch(run: TrainingRun, state, step_fn, step: int, epoch: int, cache, stop):
    """The rest of `epoch` from `step` (its start, or inside it when resumed); returns (state,
    step, whether a stop was agreed at the run's last step)."""
    config = run.config
    done_in_epoch = step - epoch * run.steps_per_epoch
    batches = epoch_batches(
        run.source, epoch, done_in_epoch * config.train.batch_size, config, cache
    )
    bar = tqdm.tqdm(
        total=run.steps_per_epoch,
        initial=done_in_epoch,
        desc=f"{run.label} epoch {epoch + 1}/{config.train.epochs}".strip(),
        disable=jax.process_index() != 0,
        leave=False,
    )
    pending, stopped = None, False  # pending: (step, metrics, filenames, rate), checked late
    t0, images_seen = time.time(), 0
    for local in batches:
        inputs = step_inputs(local, stop.requested())
        state, step_metrics = step_fn(state, run.backbone, sharding.global_batch(inputs, run.mesh))
        step += 1
        images_seen += len(local["filename"]) * jax.process_count()
        latest = (step, step_metrics, local["filename"], images_seen / (time.time() - t0))
        if pending is not None:
            stopped = _stop_agreed(run, pending, latest, step, state)
        pending = latest
        bar.update(1)
    bar.close()
    if pending is not None:
        stopped = _stop_agreed(run, pending, pending, step, state) or stopped
    return state, step, stopped


def _stop_agreed(run: TrainingRun, checked: tuple, latest: tuple, step: int, state) -> bool:
    """Logs the `checked` step; True when any process asked to stop in its batch (all processes
    see the same value after the same step). Before the last step, saves `state` as `step`
    (the `latest` step, logged too) and raises Interrupted; a run without checkpoints raises
    Interrupted at any step."""
    run.record_step(checked)
    if not bool(checked[1]["stop"]):
        return False
    if run.checkpoints is None:
        raise Interrupted(
            f"stopped at step {step} of {run.label or 'a run without checkpoints'}, which keeps "
            "no checkpoint; run the same command again to start it again"
        )
    if step < run.total_steps:
        if latest is not checked:
            run.record_step(latest)
        run.save(step, state)
        raise Interrupted(f"stopped at step {step}; run the same command again to continue")
    return True  # the last step: training is complete, the caller saves it as final
