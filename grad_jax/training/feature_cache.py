"""Backbone features of the training images, computed once and kept on the host.

Without augmentation a training image's backbone features never change, so by default
(`train.cache_features='auto'`, within `train.cache_max_gb`) they are extracted once; later
epochs (and recipe-selection probes) then train the head from them alone. `training_cache` is
the one entry point: it decides, and extracts with the configured `model.precision`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import auto as tqdm

from grad_jax.data import input_pipeline
from grad_jax.devices import sharding
from grad_jax.devices.precision import with_precision
from grad_jax.errors import ConfigError
from grad_jax.models.model import ModelVariables

log = logging.getLogger(__name__)


def make_extract_fn(variables: ModelVariables, mesh, precision: str = "default") -> Callable:
    """extract(backbone, images `[B, H, W, 3]` uint8) -> the backbone's stage outputs."""
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def extract(backbone, images):
        model = variables.merge(backbone=backbone)
        return model.extract(images)

    return with_precision(jax.jit(extract, in_shardings=(rep, data), out_shardings=data), precision)


def training_cache(
    variables: ModelVariables, backbone, source, config: ml_collections.ConfigDict, mesh
) -> tuple[list[np.ndarray], list[str | None]] | None:
    """The feature cache `(features, names)` of the images of `source` when the config asks for
    one (`use_cache`), else None: extracted with `model.precision`, as the training step reads
    them. The one way a cache is made, for a full run and a recipe-selection probe alike.

    `variables`: the model (its backbone's structure); `backbone`: its weights, replicated on
    `mesh`."""
    shapes = feature_shapes(variables, config)
    if not use_cache(config, shapes, len(source)):
        return None
    extract = make_extract_fn(variables, mesh, config.model.precision)
    return build_feature_cache(extract, backbone, source, config, mesh, shapes)


def feature_shapes(
    variables: ModelVariables, config: ml_collections.ConfigDict
) -> list[tuple[int, ...]]:
    """`[(h_i, w_i, C_i)]`: the shape of one image's features at each used stage."""
    h, w = config.data.image_size
    shapes = jax.eval_shape(
        lambda b, x: variables.merge(backbone=b).extract(x),
        variables.backbone,
        jax.ShapeDtypeStruct((1, h, w, 3), jnp.uint8),
    )
    return [tuple(s.shape[1:]) for s in shapes]


def use_cache(config: ml_collections.ConfigDict, shapes: Sequence[tuple[int, ...]], n: int) -> bool:
    """Whether to cache the features of `n` images (`train.cache_features`: on, off, or auto:
    when they fit in `train.cache_max_gb`)."""
    mode = config.train.cache_features
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"config.train.cache_features={mode!r}: expected 'auto', 'on' or 'off'")
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
) -> tuple[list[np.ndarray], list[str | None]]:
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


def cached_batches(
    cache: Sequence[np.ndarray], names: Sequence[str | None], order, global_batch: int, source: Any
) -> Iterator[dict[str, Any]]:
    """This process's rows of each global batch of `order`, from the cache: {'feature_<i>':
    `[b, h_i, w_i, C_i]`, 'filename': the rows' files}."""
    for start in range(0, len(order), global_batch):
        mine = sharding.process_rows(order[start : start + global_batch])
        batch: dict[str, Any] = {f"feature_{i}": c[mine] for i, c in enumerate(cache)}
        batch["filename"] = _BatchNames(mine, names, source)
        yield batch
