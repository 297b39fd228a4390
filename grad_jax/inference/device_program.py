"""The jitted predict function: images in, anomaly maps, image scores and pooled features out.

Prediction runs backbone, neck, head, anomaly map, the 21x21 smoothing and the image score in one
XLA program (`predict_program`, also what `grad_jax.export` serialises); `make_predict_fn` runs
it sharded over the devices from host numpy batches, and `whole_image_fn` scores images of any
size by their tiles (through the scorer's tiled path). Evaluation, threshold calibration and the
scorer (`Predictor`, the service) all stand on these.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from grad_jax.config import tiling_on
from grad_jax.devices import sharding
from grad_jax.devices.precision import with_precision
from grad_jax.errors import ConfigError
from grad_jax.inference.scorer import ScoringSpec, score_tiles
from grad_jax.models import knn, scoring
from grad_jax.models.model import ModelVariables, pool_features


def predict_program(
    variables: ModelVariables,
    config: ml_collections.ConfigDict,
    map_stats: dict[str, dict[str, float]] | None = None,
    all_kinds: bool = False,
) -> Callable[..., dict[str, jax.Array]]:
    """The traced predict computation, shared by `make_predict_fn` and `grad_jax.export`:
    (backbone, params, batch_stats, bank, images `[B, H, W, 3]` uint8) -> {'raw', 'smoothed':
    `[B, H, W]` float32, 'score': `[B]`, 'pooled': `[B, D]`}.

    'raw' is the anomaly map of the model's kind (`model.kind`: GRAD's upsampled distance, the
    nearest-neighbour map to the memory `bank`, or both standardised by `map_stats` and
    averaged; `models.knn.kind_map`), before smoothing; 'smoothed' the map the score is computed
    from; 'pooled' the backbone's stage outputs averaged over positions (class recognition). The
    input normalisation is inside. With `all_kinds`, also 'raw_grad' and (with a bank)
    'raw_knn': every kind's raw map, for evaluation and calibration.
    """
    size, pool = config.eval.smooth_size, config.eval.score_pool
    kind = config.model.get("kind", "grad")  # absent in run folders from before the field
    has_bank = variables.bank is not None
    if kind != "grad" and not has_bank:
        raise ConfigError(
            f"model.kind={kind!r} needs the kNN memory bank, which this model does not hold "
            "(trained with knn.fraction = 0, or before the baseline existed): retrain it"
        )
    want = {"grad": all_kinds or kind != "knn", "knn": has_bank and (all_kinds or kind != "grad")}
    # Calibration scores every kind before the statistics 'grad+knn' needs exist; its 'raw'
    # then holds GRAD's map (it reads the 'raw_<kind>' maps only).
    primary = "grad" if all_kinds and kind == "grad+knn" and not map_stats else kind
    knn_section = config.get("knn")
    patch_size = knn_section.patch_size if knn_section is not None else 3
    stride = config.model.out_stride

    def predict(backbone, params, stats, bank, images):
        model = variables.merge(backbone, params, stats)
        features = model.extract(images)
        maps = {}
        if want["grad"]:
            maps["grad"] = model.from_features(features, train=False).anomaly_map
            maps["grad"] = maps["grad"].astype(jax.numpy.float32)
        if want["knn"]:
            x = model.neck(features)
            maps["knn"] = knn.knn_map(x, bank, upsample=stride, patch_size=patch_size)
        raw = knn.kind_map(primary, maps, map_stats)
        smoothed = scoring.smooth(raw, size)
        out = {
            "raw": raw,
            "smoothed": smoothed,
            "score": scoring.image_scores(smoothed, pool),
            "pooled": pool_features(features),
        }
        if all_kinds:
            out.update({f"raw_{k}": v for k, v in maps.items()})
        return out

    return predict


def map_stats(meta: dict) -> dict[str, dict[str, float]] | None:
    """The held-out normal images' per-kind map statistics stored with a model ('grad+knn')."""
    return (meta.get("knn") or {}).get("map_stats")


def program_weights(variables: ModelVariables) -> tuple:
    """The program's weight arguments (backbone, params, batch_stats, bank) of `variables`."""
    bank = None if variables.bank is None else jax.numpy.asarray(variables.bank, jax.numpy.float32)
    return (variables.backbone, variables.params, variables.batch_stats, bank)


def make_predict_fn(
    variables: ModelVariables,
    config: ml_collections.ConfigDict,
    mesh=None,
    map_stats: dict[str, dict[str, float]] | None = None,
    all_kinds: bool = False,
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """images `[B, H, W, 3]` uint8 (host) -> the outputs of `predict_program` as numpy arrays.

    The batch is padded to a multiple of the device count and split over the devices.
    """
    mesh = mesh or sharding.make_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    predict = predict_program(variables, config, map_stats, all_kinds)
    jitted = with_precision(
        jax.jit(predict, in_shardings=(rep, rep, rep, rep, data), out_shardings=data),
        config.model.get("precision", "default"),  # run folders from before the field
    )
    placed = sharding.replicate(program_weights(variables), mesh)
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


class PaddedProgram:
    """A host predict function (`make_predict_fn`) as a `scorer.Program`: every call is padded
    to the same `rows` (a multiple of the device count), so it compiles once and splits evenly
    over the devices."""

    def __init__(self, predict: Callable[[np.ndarray], dict[str, np.ndarray]], rows: int):
        devices = jax.device_count()
        self._rows = -(-int(rows) // devices) * devices
        self._predict = predict

    def rows(self, n: int) -> int:
        return self._rows

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._predict(images)


def whole_image_fn(predict: Callable, config: ml_collections.ConfigDict) -> Callable:
    """What scores whole images `[B, H, W, 3]` uint8 (host) -> {'raw', 'smoothed' `[B, H, W]`,
    'score' `[B]`, 'pooled' `[B, D]`}: `predict` itself, or with `data.tile.size > 0` the
    scorer's tiled path (`scorer.score_tiles`: every tile scored in batches of
    `eval.batch_size`, the raw maps stitched, then smoothed and scored as a whole), for images
    already at their tiling scale."""
    if not tiling_on(config):
        return predict
    spec = ScoringSpec.from_config(config)
    program = PaddedProgram(predict, config.eval.batch_size)
    batch = program.rows(1)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        outs = score_tiles(program, list(np.asarray(images)), spec, batch)
        return {k: np.stack([o[k] for o in outs]) for k in outs[0]}

    return run
