"""train_and_evaluate(config, workdir): data, state, the sharded training step, checkpoints.

The trainable state (head params, BN statistics, optimiser state, step) is separate from the
frozen backbone, which is passed to the step as a constant. The step is `jax.jit` with
`in_shardings` / `out_shardings` over a `Mesh` with a `data` axis (pjit-style), with the state
donated. Without augmentation the backbone's features of a training image never change, so by
default they are computed once and cached on the host; later epochs train the head alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import auto as tqdm

from grad_jax import checkpointing, evaluate, input_pipeline, sharding
from grad_jax import workdir as wd
from grad_jax.models.grad_head import feature_loss
from grad_jax.models.model import build_model, split_model, to_flat
from grad_jax.optim import make_optimizer
from grad_jax.precision import PRECISIONS, with_precision

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the step and the batch's files."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""


# ---------------------------------------------------------------------------------------------
# The jitted functions
# ---------------------------------------------------------------------------------------------


def make_train_step(
    variables: wd.ModelVariables,
    tx,
    mesh,
    from_features: bool,
    seed: int,
    precision: str = "default",
) -> Callable:
    """step(state, backbone, batch) -> (state, metrics). Batch: 'image' or 'feature_<i>'."""
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    base_key = jax.random.key(seed)

    def step(state, backbone, batch):
        noise_key = jax.random.fold_in(base_key, state["step"])

        def loss_fn(params):
            model = variables.merge(backbone, params, state["batch_stats"])
            if from_features:
                feats = [batch[f"feature_{i}"] for i in range(len(model.backbone.out_blocks))]
                out = model.from_features(feats, train=True, noise_key=noise_key)
            else:
                out = model(batch["image"], train=True, noise_key=noise_key)
            new_stats = to_flat(split_model(model)[3])
            return feature_loss(out), new_stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "batch_stats": stats,
            "opt_state": opt_state,
        }
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # Every process's stop request rides with its rows of the batch: the maximum is the
        # same on all processes, so they all stop after the same step (see _train_loop).
        stop = jnp.max(batch["stop"]) if "stop" in batch else jnp.zeros((), jnp.int32)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "stop": stop}

    jitted = jax.jit(
        step,
        in_shardings=(rep, rep, data),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    return with_precision(jitted, precision)


def make_extract_fn(variables: wd.ModelVariables, mesh, precision: str = "default") -> Callable:
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def extract(backbone, images):
        model = variables.merge(backbone=backbone)
        return model.extract(images)

    return with_precision(jax.jit(extract, in_shardings=(rep, data), out_shardings=data), precision)


# ---------------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------------


def feature_shapes(variables: wd.ModelVariables, config) -> list[tuple[int, ...]]:
    h, w = config.data.image_size
    shapes = jax.eval_shape(
        lambda b, x: variables.merge(backbone=b).extract(x),
        variables.backbone,
        jax.ShapeDtypeStruct((1, h, w, 3), jnp.uint8),
    )
    return [tuple(s.shape[1:]) for s in shapes]


def use_cache(config, shapes, n: int) -> bool:
    mode = config.train.cache_features
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.train.cache_features={mode!r}: expected 'auto', 'on' or 'off'")
    gigabytes = n * sum(math.prod(s) for s in shapes) * 4 / 2**30
    if mode == "auto":
        fits = gigabytes <= config.train.cache_max_gb
        log.info(
            "feature cache: %.2f GB for %d images -> %s", gigabytes, n, "on" if fits else "off"
        )
        return fits
    return mode == "on"


def build_feature_cache(
    extract, backbone, source, config, mesh, shapes
) -> tuple[list[np.ndarray], list[str]]:
    """Backbone features and file names of every training image, in `source` order, on every
    process (each process decodes only its own share)."""
    n = len(source)
    cache = [np.zeros((n,) + s, np.float32) for s in shapes]
    filenames: list[str | None] = [None] * n
    devices = jax.device_count()
    batch = max(config.train.batch_size // devices, 1) * devices
    # Each process decodes only its share of every batch; the order is padded with repeats of
    # the last image so every batch splits evenly, and the features are gathered everywhere.
    order = np.concatenate([np.arange(n), np.full(-n % batch, n - 1)]).astype(np.int64)
    bar = tqdm.tqdm(total=n, desc="caching backbone features", disable=jax.process_index() != 0)
    for inputs in input_pipeline.batches(source, order, batch):
        feats = extract(backbone, sharding.global_batch({"x": inputs["image"]}, mesh)["x"])
        positions = inputs["position"]
        for p, name in zip(positions, inputs["filename"], strict=True):
            filenames[int(p)] = str(name)  # this process's share; others are resolved lazily
        if jax.process_count() > 1:
            feats = multihost_utils.process_allgather(feats, tiled=True)
            positions = multihost_utils.process_allgather(positions, tiled=True)
        positions = np.asarray(positions)
        for c, f in zip(cache, feats, strict=True):
            c[positions] = np.asarray(f)
        bar.update(len(set(positions.tolist())))
    bar.close()
    return cache, filenames


# ---------------------------------------------------------------------------------------------
# Run records
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; truncated to the resumed step."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError):
                        break  # a line cut by a kill: drop it and what follows
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class StopFlag:
    """SIGINT/SIGTERM set a flag. The flag travels inside the next training step's batch; when
    that step's result shows a request from any process, every process saves a checkpoint after
    the same step and stops (one step later than the signal, and never a hang when the signal
    reaches only some hosts)."""

    def __init__(self):
        self.stop = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def requested(self) -> bool:
        return self.stop

    def _handle(self, signum, frame):
        if self.stop:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop = True
        log.warning("signal %d: saving a checkpoint and stopping (send again to abort)", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def validate_config(config, *, training: bool = True) -> None:
    """Check every value a run depends on before any work starts; all problems in one error."""
    from grad_jax.models.efficientnet import VARIANTS
    from grad_jax.models.layers import DEPTHWISE_IMPLS

    m, d, t, e = config.model, config.data, config.train, config.eval
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(m.backbone in VARIANTS, f"model.backbone={m.backbone!r}: one of {', '.join(VARIANTS)}")
    need(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: 'float32' or 'bfloat16'")
    precision = m.get("precision", "default")  # absent in run folders from before the field
    need(precision in PRECISIONS, f"model.precision={precision!r}: one of {PRECISIONS}")
    need(m.depthwise_impl in DEPTHWISE_IMPLS, f"model.depthwise_impl: one of {DEPTHWISE_IMPLS}")
    need(m.ch_exp > 0 and m.ch_exp % 4 == 0, f"model.ch_exp={m.ch_exp}: a positive multiple of 4")
    need(m.layers >= 1, "model.layers must be at least 1")
    need(m.local_resol >= 1 and m.global_resol >= 1, "model.local_resol/global_resol >= 1")
    layers_ok = len(m.out_layers) >= 1 and all(1 <= x <= 5 for x in m.out_layers)
    need(layers_ok, f"model.out_layers={tuple(m.out_layers)}: stage numbers in 1..5")
    if layers_ok:
        finest = 2 ** min(m.out_layers)
        need(
            m.out_stride in (1, 2, 4, 8, 16, 32) and m.out_stride <= finest,
            f"model.out_stride={m.out_stride}: a power of two no larger than {finest}",
        )
        coarsest = 2 ** max(m.out_layers)
        if d.image_size == input_pipeline.AUTO_SIZE:
            need(
                isinstance(d.auto_pixels, int) and d.auto_pixels >= coarsest * coarsest,
                f"data.auto_pixels={d.auto_pixels!r}: an int of at least {coarsest * coarsest}",
            )
        else:
            size_ok = (
                isinstance(d.image_size, tuple | list)
                and len(d.image_size) == 2
                and all(isinstance(n, int) and n > 0 and n % coarsest == 0 for n in d.image_size)
            )
            need(
                size_ok,
                f"data.image_size={d.image_size!r}: (height, width), two multiples of the "
                f"coarsest stride {coarsest} (e.g. {(coarsest * 14, coarsest * 6)}), or 'auto'",
            )
        tile = d.get("tile")
        if tile is not None and tile.size:
            need(
                isinstance(tile.size, int) and tile.size > 0 and tile.size % coarsest == 0,
                f"data.tile.size={tile.size!r}: 0 (off) or a multiple of {coarsest}",
            )
            need(
                isinstance(tile.overlap, int) and 0 <= tile.overlap < tile.size,
                f"data.tile.overlap={tile.overlap!r}: pixels in [0, data.tile.size)",
            )
            need(tile.scale > 0, f"data.tile.scale={tile.scale!r}: positive (1.0 = native)")
    need(
        d.dataset in ("mvtec_ad", "folder", "demo"), "data.dataset: 'mvtec_ad', 'folder' or 'demo'"
    )
    need(e.batch_size > 0, f"eval.batch_size={e.batch_size} must be positive")
    need(e.smooth_size >= 1 and e.smooth_size % 2 == 1, "eval.smooth_size must be odd and >= 1")
    need(e.score_pool >= 1, "eval.score_pool must be >= 1")
    if training:
        need(t.epochs > 0, f"train.epochs={t.epochs} must be positive")
        need(t.cache_features in ("auto", "on", "off"), "train.cache_features: auto, on or off")
        need(0 <= config.threshold.holdout_fraction < 1, "threshold.holdout_fraction in [0, 1)")
        need(0 < config.threshold.quantile <= 1, "threshold.quantile in (0, 1]")
        need(t.lr_step_epochs > 0, "train.lr_step_epochs must be positive")
        try:
            sharding.check_batch_size(t.batch_size, "train.batch_size")
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def initial_state(variables: wd.ModelVariables, tx: optax.GradientTransformation) -> dict:
    """The train state at step 0: {step, params, batch_stats, opt_state}."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": variables.params,
        "batch_stats": variables.batch_stats,
        "opt_state": tx.init(variables.params),
    }


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

    categories = input_pipeline.open_categories(config)
    with config.ignore_type():  # 'auto' becomes the chosen (height, width), kept in config.json
        config.data.image_size = input_pipeline.resolve_image_size(config, categories)
    names = [c.name for c in categories]
    train_items, held_items = input_pipeline.split_holdout(
        categories, config.threshold.holdout_fraction, config.seed
    )
    sources = [c.train for c in categories]
    train_source = input_pipeline.training_source(config, sources, train_items, names)
    n_train = len(train_source)
    if n_train == 0:
        raise ConfigError(
            "no training images left after holding out threshold.holdout_fraction of them"
        )
    global_batch = config.train.batch_size
    devices = jax.device_count()
    steps_per_epoch = len(
        range(
            0, len(input_pipeline.epoch_order(n_train, 0, 0, global_batch, devices)), global_batch
        )
    )
    total_steps = steps_per_epoch * config.train.epochs

    ckpt = checkpointing.Checkpoints(workdir, config.train.keep_checkpoints)
    resuming = ckpt.latest_step() is not None
    run_values = {
        **checkpointing.fingerprint(config, checkpointing.RESUME_FIELDS),
        "train_images": n_train,
    }
    if resuming:  # the checkpoint holds the backbone: no weights file needed
        model = build_model(config, seed=config.seed)
    else:
        model = wd.create_model(config)
    variables = wd.ModelVariables.from_model(model)
    del model
    tx, schedules = make_optimizer(config.train, steps_per_epoch, variables.params)
    state = initial_state(variables, tx)
    meta: dict[str, Any] = {}
    start_step = 0
    if resuming:
        templates = {
            "model": {"params": state["params"], "batch_stats": state["batch_stats"]},
            "train": {"step": state["step"], "opt_state": state["opt_state"]},
            "backbone": variables.backbone,
        }
        start_step, items, meta = ckpt.restore(templates, config)
        checkpointing.check_resume(meta.get("run"), run_values, workdir)
        state = {**items["model"], **items["train"]}
        variables.backbone = items["backbone"]
        log.info("resuming from step %d (%s)", start_step, ckpt.directory)
    if jax.process_index() == 0:
        # Only now: a run restarted with an incompatible config has been refused above and
        # must not overwrite the config its checkpoints belong to.
        wd.write_config(config, workdir)

    mesh = sharding.make_mesh()
    state = sharding.replicate(state, mesh)
    backbone = sharding.replicate(variables.backbone, mesh)

    def save(step: int, state, final: bool = False, extra: dict[str, Any] | None = None) -> None:
        record = {
            "fingerprint": checkpointing.fingerprint(config),
            "step": step,
            "epoch": step / steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "final": final,
            "run": run_values,
            **(extra or {}),
        }
        items = {
            "model": {"params": state["params"], "batch_stats": state["batch_stats"]},
            "train": {"step": state["step"], "opt_state": state["opt_state"]},
            "backbone": backbone,
        }
        ckpt.save(step, items, record)

    done = bool(meta.get("final")) and start_step >= total_steps
    metrics_log = MetricsLog(workdir, start_step)
    cache, stopped = None, False
    if not done:
        state, cache, stopped = _train_loop(
            config, variables, tx, schedules, mesh, state, backbone,
            train_source, steps_per_epoch, start_step, metrics_log, save,
        )  # fmt: skip

    # Threshold from held-out normal images, with the final model.
    predict_vars = wd.ModelVariables(
        variables.graphdef, variables.templates, backbone, state["params"], state["batch_stats"]
    )
    predict = evaluate.make_predict_fn(predict_vars, config, mesh)
    if not done:
        threshold = _threshold(predict, categories, held_items, config)
        centres = _class_centres(predict_vars, cache, train_source, config, mesh)
        meta = {"threshold": threshold, "class_centres": centres, "categories": names}
        if total_steps in ckpt.steps():
            # A non-final save of the last step (an interrupt there, by an older version):
            # the state is the one just restored from it, so replacing it loses nothing.
            ckpt.delete(total_steps)
        save(total_steps, state, final=True, extra=meta)
    ckpt.close()
    if stopped:
        raise Interrupted(
            f"stopped after the last step; training is complete and saved (step {total_steps}). "
            "Run the same command again to evaluate."
        )

    results = evaluate.evaluate_categories(predict, categories, config)
    info = {
        "model": f"final (epoch {config.train.epochs}), not selected on the test set",
        "threshold": meta.get("threshold"),
        "step": total_steps,
        **(extra_info or {}),
    }
    return evaluate.publish(workdir, results, info, meta.get("class_centres"))


def _threshold(predict, categories, held_items, config) -> dict[str, Any] | None:
    if not held_items:
        log.info("no held-out images (threshold.holdout_fraction = 0): no decision threshold")
        return None
    scores = evaluate.score_held_out(predict, categories, held_items, config)
    names = [c.name for c in categories]
    q = config.threshold.quantile
    per_category, normal_scores = {}, {}
    for c, name in enumerate(names):
        mine = scores[[i for i, item in enumerate(held_items) if item.category == c]]
        if len(mine):
            per_category[name] = float(np.quantile(mine, q))
            normal_scores[name] = sorted(float(x) for x in mine)  # for calibrated values
    return {
        "image_score": float(np.quantile(scores, q)),
        "quantile": q,
        "num_images": len(scores),
        "per_category": per_category,
        "normal_scores": normal_scores,
        "source": "held-out normal training images (never trained on)",
    }


def _class_centres(variables, cache, train_source, config, mesh) -> dict[str, Any]:
    """Mean pooled backbone feature of each class's training images (nearest-centre class
    recognition at inference). From the feature cache when there is one, else one backbone pass.
    """
    if cache is not None:
        pooled = np.concatenate([c.mean(axis=(1, 2), dtype=np.float64) for c in cache], axis=1)
    else:
        pooled_fn = evaluate.make_pooled_fn(variables, mesh)
        parts = evaluate.predict_items(
            pooled_fn, train_source, config.eval.batch_size, "class centres"
        )
        pooled = np.concatenate([out["pooled"] for _, out in parts]).astype(np.float64)
    items = train_source.items
    if isinstance(train_source, input_pipeline.TiledSource):  # one record per tile
        labels = np.array([items[k].category for k, *_ in train_source.entries])
    else:
        labels = np.array([item.category for item in items])
    names, centres, counts = [], [], []
    for c, name in enumerate(train_source.names):
        mine = pooled[labels == c]
        if len(mine):
            names.append(name)
            centres.append(mine.mean(axis=0).astype(np.float32).tolist())
            counts.append(len(mine))
    return {
        "names": names,
        "centres": centres,
        "num_images": counts,
        "feature": "backbone stage outputs "
        f"{tuple(config.model.out_layers)} averaged over positions, concatenated",
        "distance": "euclidean",
    }


def _train_loop(
    config, variables, tx, schedules, mesh, state, backbone, train_source,
    steps_per_epoch, start_step, metrics_log, save,
):  # fmt: skip
    """Run the remaining epochs; returns (final state, the feature cache or None, whether a
    stop was asked at the last step). A stop before the last step saves a checkpoint and raises
    Interrupted."""
    n_train = len(train_source)
    global_batch = config.train.batch_size
    devices = jax.device_count()
    shapes = feature_shapes(variables, config)
    cached = use_cache(config, shapes, n_train)
    cache = names = None
    if cached:
        extract = make_extract_fn(variables, mesh, config.model.precision)
        cache, names = build_feature_cache(extract, backbone, train_source, config, mesh, shapes)
    step_fn = make_train_step(variables, tx, mesh, cached, config.seed, config.model.precision)

    start_epoch = start_step // steps_per_epoch
    total_steps = steps_per_epoch * config.train.epochs
    step = start_step
    pending = None  # (step, metrics, filenames): checked one step late to keep the device busy
    with StopFlag() as stop:

        def stop_agreed(checked, latest) -> bool:
            """Logs the `checked` step; True when any process asked to stop in its batch (all
            processes see the same value after the same step). Before the last step, saves the
            `latest` step (logged too) and raises Interrupted."""
            _check_and_log(checked, metrics_log, schedules, config, steps_per_epoch)
            if not bool(checked[1]["stop"]):
                return False
            if step < total_steps:
                if latest is not checked:
                    _check_and_log(latest, metrics_log, schedules, config, steps_per_epoch)
                save(step, state)
                raise Interrupted(f"stopped at step {step}; run the same command again to continue")
            return True  # the last step: training is complete, the caller saves it as final

        stopped = False
        for epoch in range(start_epoch, config.train.epochs):
            order = input_pipeline.epoch_order(n_train, config.seed, epoch, global_batch, devices)
            skip = (step - epoch * steps_per_epoch) * global_batch
            order = order[skip:]
            if cached:
                local_batches = _cached_batches(cache, names, order, global_batch, train_source)
            else:
                local_batches = input_pipeline.batches(
                    train_source, order, global_batch, workers=config.data.num_workers
                )
            bar = tqdm.tqdm(
                total=steps_per_epoch,
                initial=step - epoch * steps_per_epoch,
                desc=f"epoch {epoch + 1}/{config.train.epochs}",
                disable=jax.process_index() != 0,
                leave=False,
            )
            t0, images_seen = time.time(), 0
            for local in local_batches:
                filenames = local.pop("filename")
                local.pop("mask", None)
                local.pop("label", None)
                local.pop("category", None)
                local.pop("position", None)
                local["stop"] = np.full((len(filenames),), int(stop.requested()), np.int32)
                batch = sharding.global_batch(local, mesh)
                state, step_metrics = step_fn(state, backbone, batch)
                step += 1
                images_seen += len(filenames) * jax.process_count()
                latest = (step, step_metrics, filenames, images_seen / (time.time() - t0))
                if pending is not None:
                    stopped = stop_agreed(pending, latest)
                pending = latest
                bar.update(1)
            bar.close()
            if pending is not None:
                stopped = stop_agreed(pending, pending) or stopped
                pending = None
            every = config.train.checkpoint_every_epochs
            last_epoch = epoch + 1 == config.train.epochs
            if not last_epoch and every > 0 and (epoch + 1) % every == 0:
                save(step, state)
    return state, cache, stopped


class _BatchNames:
    """File names of a cached batch, resolved only if someone reads them (the NaN message):
    names decoded by another process are read back from the dataset on demand."""

    def __init__(self, positions, names, source):
        self.positions, self.names, self.source = positions, names, source

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        for p in self.positions:
            name = self.names[int(p)]
            yield name if name is not None else str(self.source[int(p)]["filename"])


def _cached_batches(cache, names, order, global_batch, source):
    processes, rank = jax.process_count(), jax.process_index()
    for start in range(0, len(order), global_batch):
        chunk = order[start : start + global_batch]
        share = len(chunk) // processes
        mine = chunk[rank * share : (rank + 1) * share]
        batch = {f"feature_{i}": c[mine] for i, c in enumerate(cache)}
        batch["filename"] = _BatchNames(mine, names, source)
        yield batch


def _check_and_log(pending, metrics_log, schedules, config, steps_per_epoch) -> None:
    step, step_metrics, filenames, rate = pending
    loss = float(step_metrics["loss"])
    if not np.isfinite(loss):
        shown = ", ".join(list(filenames)[:16])
        raise NonFiniteLossError(
            f"loss became {loss} at step {step} (epoch {(step - 1) // steps_per_epoch + 1}); "
            f"batch files: {shown}. The last good checkpoint is kept; check these images or "
            "lower the learning rates."
        )
    if step % config.train.log_every_steps == 0 or step == 1:
        metrics_log.write(
            {
                "step": step,
                "epoch": (step - 1) // steps_per_epoch,
                "loss": loss,
                "grad_norm": float(step_metrics["grad_norm"]),
                "lr_grid": float(schedules["grid"](step - 1)),
                "lr_net": float(schedules["net"](step - 1)),
                "images_per_s": rate,
            }
        )
