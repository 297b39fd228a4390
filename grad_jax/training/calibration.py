"""Calibration with the final model, from training images only: the decision threshold (from the
held-out normal images, never trained on) and the class centres (nearest-centre recognition).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from grad_jax.data import input_pipeline
from grad_jax.evaluation import evaluate
from grad_jax.inference import device_program

log = logging.getLogger(__name__)


def score_held_out(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    items: Sequence[input_pipeline.Item],
    config: ml_collections.ConfigDict,
) -> np.ndarray:
    """`[N]` image scores of training-split `items` (the held-out normal images), scored as the
    test images are (whole images, or stitched tiles)."""
    if not items:
        return np.zeros((0,), np.float32)
    sources = [c.train for c in categories]
    size = input_pipeline.eval_image_size(config, sources, items)
    names = [c.name for c in categories]
    source = input_pipeline.IndexedSource(sources, items, size, names, masks=False)
    score = device_program.whole_image_fn(predict, config)
    parts = evaluate.predict_items(score, source, config.eval.batch_size, "threshold")
    return np.concatenate([out["score"] for _, out in parts])


def decision_threshold(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    held_items: Sequence[input_pipeline.Item],
    config: ml_collections.ConfigDict,
) -> dict[str, Any] | None:
    """The decision threshold: the `threshold.quantile` of the held-out normal images' scores,
    run-wide and per category (with their sorted scores, for calibrated values); None without
    held-out images."""
    if not held_items:
        log.info("no held-out images (threshold.holdout_fraction = 0): no decision threshold")
        return None
    scores = score_held_out(predict, categories, held_items, config)
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


def class_centres(variables, cache, train_source, config, mesh) -> dict[str, Any]:
    """Mean pooled backbone feature of each class's training images (nearest-centre class
    recognition at inference). From the feature cache when there is one, else one backbone pass.
    """
    if cache is not None:
        pooled = np.concatenate([c.mean(axis=(1, 2), dtype=np.float64) for c in cache], axis=1)
    else:
        pooled_fn = device_program.make_pooled_fn(variables, mesh)
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
