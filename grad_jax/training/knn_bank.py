"""The nearest-neighbour baseline's memory bank, made at the end of training.

The bank is a greedy k-center coreset (`knn.fraction` of them, `models.knn.build_memory_bank`) of
the training images' patch features: the neck's output (the backbone stages GRAD reads, brought
to stride 8 and concatenated) averaged over `knn.patch_size` neighbourhoods. The features come
from the feature cache the training already holds, or (no cache) from one backbone pass over the
training images. Every process makes the same bank from the same features.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from grad_jax.devices import sharding
from grad_jax.models import knn
from grad_jax.models.model import ModelVariables
from grad_jax.training import feature_cache

log = logging.getLogger(__name__)


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for the baseline (`knn.fraction > 0`)."""
    section = config.get("knn")
    return section is not None and section.fraction > 0


def patch_fn(variables: ModelVariables, patch_size: int):
    """stage features (list of `[B, h_i, w_i, C_i]`) -> patch features `[B * h * w, C]`."""

    @jax.jit
    def patches(backbone, stage_features):
        model = variables.merge(backbone=backbone)
        x = model.neck(stage_features)
        return knn.patch_features(x, patch_size).reshape(-1, x.shape[-1])

    return patches


def training_patches(
    variables: ModelVariables, cache, source, config: ml_collections.ConfigDict, mesh
) -> np.ndarray:
    """`[N * h * w, C]` float32 patch features of every training image (or tile) of `source`:
    from `cache` (the feature cache's per-stage arrays) when given, else from one backbone pass
    made as the cache would be (with `model.precision`)."""
    if cache is None:
        shapes = feature_cache.feature_shapes(variables, config)
        extract = feature_cache.make_extract_fn(variables, mesh, config.model.precision)
        backbone = sharding.replicate(variables.backbone, mesh)
        cache, _ = feature_cache.build_feature_cache(
            extract, backbone, source, config, mesh, shapes
        )
    patches = patch_fn(variables, config.knn.patch_size)
    n, batch = len(cache[0]), config.eval.batch_size
    parts = []
    for start in tqdm.trange(
        0, n, batch, desc="kNN patches", disable=jax.process_index() != 0, leave=False
    ):
        stages = [jnp.asarray(c[start : start + batch]) for c in cache]
        parts.append(np.asarray(patches(variables.backbone, stages)))
    return np.concatenate(parts).astype(np.float32)


def build_bank(
    variables: ModelVariables, cache, source, config: ml_collections.ConfigDict, mesh
) -> np.ndarray:
    """The memory bank `[M, C]` float32 of the training images (see the module docstring)."""
    t0 = time.time()
    features = training_patches(variables, cache, source, config, mesh)
    projection = int(config.knn.projection_dim) or None
    key = jax.random.key(config.seed)
    bank, _ = knn.build_memory_bank(
        features, config.knn.fraction, key=key, projection_dim=projection
    )
    bank = np.asarray(bank, np.float32)
    log.info(
        "kNN memory bank: %d of %d patch features (%.0f%%, %d dims, %.1f MB) in %.0f s",
        len(bank), len(features), 100 * config.knn.fraction, bank.shape[1],
        bank.nbytes / 2**20, time.time() - t0,
    )  # fmt: skip
    return bank
