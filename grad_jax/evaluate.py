"""The jitted predict function, the evaluation loop, and metrics.json.

Prediction runs backbone, neck, head, anomaly map, the 21x21 smoothing and the image score in one
XLA program; only the results come back to the host, where `metrics` computes AUROC, AUPRO, AP
and F1-max per category.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import auto as tqdm

from grad_jax import input_pipeline, metrics, scoring, sharding
from grad_jax.workdir import ModelVariables

log = logging.getLogger(__name__)


def make_predict_fn(
    variables: ModelVariables, config: ml_collections.ConfigDict, mesh=None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """images `[B, H, W, 3]` uint8 (host) -> {'raw', 'smoothed': `[B, H, W]`, 'score': `[B]`}.

    'raw' is the anomaly map as the model outputs it (upsampled distance, no smoothing).
    The batch is padded to a multiple of the device count and split over the devices.
    """
    mesh = mesh or sharding.make_mesh()
    size, pool = config.eval.smooth_size, config.eval.score_pool
    rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def predict(backbone, params, stats, images):
        model = variables.merge(backbone, params, stats)
        out = model(images, train=False)
        smoothed = scoring.smooth(out.anomaly_map, size)
        return {
            "raw": out.anomaly_map,
            "smoothed": smoothed,
            "score": scoring.image_scores(smoothed, pool),
        }

    from grad_jax.precision import with_precision

    jitted = with_precision(
        jax.jit(predict, in_shardings=(rep, rep, rep, data), out_shardings=data),
        config.model.get("precision", "default"),  # run folders from before the field
    )
    placed = sharding.replicate((variables.backbone, variables.params, variables.batch_stats), mesh)
    devices = jax.device_count()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        """`images` is the whole batch, the same on every process."""
        n = images.shape[0]
        padded = -n % devices
        if padded:
            images = np.concatenate([images, np.zeros((padded,) + images.shape[1:], images.dtype)])
        share = images.shape[0] // jax.process_count()
        rank = jax.process_index()
        local = images[rank * share : (rank + 1) * share]
        out = jitted(*placed, sharding.global_batch({"x": local}, mesh)["x"])
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    return run


@dataclasses.dataclass
class CategoryEval:
    """Everything the metrics and the report need about one category's test split."""

    name: str
    filenames: list[str]
    labels: np.ndarray  # [N] 1 if the (resized) mask has a positive pixel, as the reference
    scores: np.ndarray  # [N] image scores
    maps: np.ndarray  # [N, H, W] smoothed anomaly maps
    masks: np.ndarray  # [N, H, W] {0, 1}
    source: Any = None  # IndexedSource, to re-read images for the report


def predict_items(
    predict: Callable, source: input_pipeline.IndexedSource, batch: int, desc: str = ""
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(inputs, outputs) per batch over all of `source`; every process reads whole batches."""
    order = np.arange(len(source))
    it = input_pipeline.batches(source, order, batch, split_processes=False)
    bar = tqdm.tqdm(total=len(source), desc=desc, disable=jax.process_index() != 0, leave=False)
    for inputs in it:
        outputs = predict(inputs["image"])
        bar.update(len(outputs["score"]))
        yield inputs, outputs
    bar.close()


def evaluate_categories(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    config: ml_collections.ConfigDict,
) -> list[CategoryEval]:
    names = [c.name for c in categories]
    results = []
    for c, cat in enumerate(categories):
        source = input_pipeline.IndexedSource(
            [x.test for x in categories],
            input_pipeline.test_items(categories, c),
            config.data.image_size,
            names,
        )
        scores, maps, masks, files = [], [], [], []
        for inputs, outputs in predict_items(
            predict, source, config.eval.batch_size, f"eval {cat.name}"
        ):
            scores.append(outputs["score"])
            maps.append(outputs["smoothed"])
            masks.append(inputs["mask"])
            files.extend(inputs["filename"].tolist())
        masks_np = np.concatenate(masks)
        results.append(
            CategoryEval(
                cat.name,
                files,
                masks_np.reshape(len(masks_np), -1).any(axis=1).astype(np.int32),
                np.concatenate(scores),
                np.concatenate(maps),
                masks_np,
                source,
            )
        )
    return results


def compute_metrics(results: Sequence[CategoryEval]) -> tuple[dict[str, float], list[str]]:
    per_class = {
        r.name: metrics.CategoryResults(r.scores, r.labels, r.maps, r.masks) for r in results
    }
    return metrics.evaluate(per_class)


def publish(
    workdir: str, results: Sequence[CategoryEval], info: dict[str, Any]
) -> dict[str, float]:
    """Metrics of `results` -> metrics.json, a printed table, and the visual report (process 0
    writes; every process gets the values)."""
    values, notes = compute_metrics(results)
    if jax.process_index() == 0:
        write_metrics(workdir, values, notes, info)
        print(metrics.format_table(values))
        for note in notes:
            print("note:", note)
        from grad_jax import visualize

        visualize.write_report(workdir, results, values, info.get("threshold"))
    return values


def write_metrics(
    workdir: str,
    values: dict[str, float],
    notes: list[str],
    extra: dict[str, Any] | None = None,
    filename: str = "metrics.json",
) -> str:
    """metrics.json: flat metric keys plus 'notes' and run information."""
    payload: dict[str, Any] = {k: (None if np.isnan(v) else float(v)) for k, v in values.items()}
    payload["notes"] = list(notes)
    payload.update(extra or {})
    path = os.path.join(workdir, filename)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def score_items(
    predict: Callable, source: input_pipeline.IndexedSource, batch: int, desc: str
) -> np.ndarray:
    """Image scores of every item of `source` (e.g. the held-out normal images)."""
    if len(source) == 0:
        return np.zeros((0,), np.float32)
    return np.concatenate([out["score"] for _, out in predict_items(predict, source, batch, desc)])


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict:
    """--mode=eval: reload the latest checkpoint of `workdir` and evaluate it on the test data
    of `config` (default: the run's own config.json). Writes metrics.json and the report."""
    from grad_jax import workdir as wd

    sharding.maybe_initialize_distributed()
    if config is not None:
        from grad_jax.train import validate_config

        validate_config(config, training=False)
    trained = wd.load_trained(workdir, config=config)
    config = trained.config
    categories = input_pipeline.open_categories(config)
    predict = make_predict_fn(trained.variables, config)
    results = evaluate_categories(predict, categories, config)
    info = {"model": f"checkpoint step {trained.step}", "threshold": trained.meta.get("threshold")}
    return publish(workdir, results, info)
