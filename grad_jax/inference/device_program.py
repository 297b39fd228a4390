"""The jitted predict function: images in, anomaly maps, image scores and pooled features out.

Prediction runs backbone, neck, head, anomaly map, the 21x21 smoothing and the image score in one
XLA program (`predict_program`, also what `grad_jax.export` serialises); `make_predict_fn` runs
it sharded over the devices from host numpy batches, and `make_tiled_predict_fn` scores images
of any size by their tiles. Evaluation, threshold calibration, the `Predictor` API and the
service all stand on these.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from grad_jax.config import tiling_on
from grad_jax.data import tiling
from grad_jax.devices import sharding
from grad_jax.devices.precision import with_precision
from grad_jax.models import scoring
from grad_jax.models.model import ModelVariables, pool_features


def predict_program(
    variables: ModelVariables, config: ml_collections.ConfigDict
) -> Callable[..., dict[str, jax.Array]]:
    """The traced predict computation, shared by `make_predict_fn` and `grad_jax.export`:
    (backbone, params, batch_stats, images `[B, H, W, 3]` uint8) -> {'raw', 'smoothed':
    `[B, H, W]` float32, 'score': `[B]`, 'pooled': `[B, D]`}.

    'raw' is the anomaly map as the model outputs it (upsampled distance, no smoothing);
    'smoothed' the map the score is computed from; 'pooled' the backbone's stage outputs
    averaged over positions (class recognition). The input normalisation is inside.
    """
    size, pool = config.eval.smooth_size, config.eval.score_pool

    def predict(backbone, params, stats, images):
        model = variables.merge(backbone, params, stats)
        features = model.extract(images)
        out = model.from_features(features, train=False)
        smoothed = scoring.smooth(out.anomaly_map, size)
        return {
            "raw": out.anomaly_map.astype(jax.numpy.float32),
            "smoothed": smoothed,
            "score": scoring.image_scores(smoothed, pool),
            "pooled": pool_features(features),
        }

    return predict


def make_predict_fn(
    variables: ModelVariables, config: ml_collections.ConfigDict, mesh=None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """images `[B, H, W, 3]` uint8 (host) -> the outputs of `predict_program` as numpy arrays.

    The batch is padded to a multiple of the device count and split over the devices.
    """
    mesh = mesh or sharding.make_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    predict = predict_program(variables, config)
    jitted = with_precision(
        jax.jit(predict, in_shardings=(rep, rep, rep, data), out_shardings=data),
        config.model.get("precision", "default"),  # run folders from before the field
    )
    placed = sharding.replicate((variables.backbone, variables.params, variables.batch_stats), mesh)
    return _on_host(jitted, placed, mesh)


def make_pooled_fn(
    variables: ModelVariables, mesh=None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """images `[B, H, W, 3]` uint8 (host) -> {'pooled': `[B, D]`}: the backbone alone."""
    mesh = mesh or sharding.make_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def pooled(backbone, images):
        return {"pooled": pool_features(variables.merge(backbone=backbone).extract(images))}

    jitted = jax.jit(pooled, in_shardings=(rep, data), out_shardings=data)
    return _on_host(jitted, sharding.replicate((variables.backbone,), mesh), mesh)


def _on_host(jitted: Callable, placed: tuple, mesh) -> Callable[[np.ndarray], dict]:
    devices = jax.device_count()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        """`images` is the whole batch, the same on every process."""
        n = images.shape[0]
        padded = -n % devices
        if padded:
            images = np.concatenate([images, np.zeros((padded,) + images.shape[1:], images.dtype)])
        local = sharding.process_rows(images)
        out = jitted(*placed, sharding.global_batch({"x": local}, mesh)["x"])
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    return run


def make_tiled_predict_fn(
    predict_tiles: Callable[[np.ndarray], dict[str, np.ndarray]],
    config: ml_collections.ConfigDict,
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Whole images by their tiles: images `[B, H, W, 3]` uint8 (any H, W of at least one tile,
    already at the tiling scale) -> {'raw', 'smoothed': `[B, H, W]`, 'score': `[B]`, 'pooled':
    `[B, D]` (the mean over the image's tiles)}.

    Every tile is scored by `predict_tiles` (a `make_predict_fn` at the tile size, fed batches
    of `eval.batch_size` tiles rounded up to a multiple of the device count, so it compiles
    once); the tiles' raw maps are stitched (overlaps averaged), then the stitched map is
    smoothed and scored as a whole.
    """
    size, overlap = config.data.tile.size, config.data.tile.overlap
    devices = jax.device_count()  # tiles go in batches that split evenly: padded once
    batch = -(-config.eval.batch_size // devices) * devices
    smooth_size, pool = config.eval.smooth_size, config.eval.score_pool

    @jax.jit
    def finish(raw):
        smoothed = scoring.smooth(raw, smooth_size)
        return smoothed, scoring.image_scores(smoothed, pool)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        hw = images.shape[1:3]
        boxes = tiling.tile_boxes(hw, size, overlap)
        tiles = np.concatenate([tiling.cut(image, boxes, size) for image in images])
        maps, pooled = [], []
        for start in range(0, len(tiles), batch):
            chunk = tiles[start : start + batch]
            padded = np.zeros((batch, *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk
            out = predict_tiles(padded)
            maps.append(out["raw"][: len(chunk)])
            pooled.append(out["pooled"][: len(chunk)])
        maps = np.concatenate(maps).reshape(len(images), len(boxes), size, size)
        raw = np.stack([tiling.stitch(m, boxes, hw) for m in maps])
        smoothed, score = finish(raw)
        # An image's pooled features: the mean over its tiles (class recognition).
        pooled = np.concatenate(pooled).reshape(len(images), len(boxes), -1).mean(axis=1)
        return {
            "raw": raw,
            "smoothed": np.asarray(smoothed),
            "score": np.asarray(score),
            "pooled": pooled,
        }

    return run


def whole_image_fn(predict: Callable, config: ml_collections.ConfigDict) -> Callable:
    """What scores whole images: `predict` itself, or its tiled form when `data.tile.size > 0`."""
    if tiling_on(config):
        return make_tiled_predict_fn(predict, config)
    return predict
