"""Calibration with the final model, from training images only: the decision threshold (from the
held-out normal images, never trained on) and the class centres with their radii (nearest-centre
recognition, and the rejection of an unknown kind of part).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from grad_jax.data import input_pipeline
from grad_jax.evaluation import evaluate
from grad_jax.inference import conformal, device_program

log = logging.getLogger(__name__)

#: Fewer training images than this give a class no radius (its spread is not known well enough
#: to reject anything): an image nearest to it is always that class.
MIN_IMAGES_FOR_RADIUS = 5
#: `threshold.class_margin` of runs whose config.json predates the key.
DEFAULT_CLASS_MARGIN = 1.5


def held_out_maps(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    items: Sequence[input_pipeline.Item],
    config: ml_collections.ConfigDict,
) -> list[dict[str, np.ndarray]]:
    """Every kind's raw map of each of `items` (the held-out normal training images), scored as
    the test images are (whole images, or stitched tiles): one {'raw_grad': `[H, W]`, 'raw_knn':
    ...} per item, in order. `predict` comes from `make_predict_fn(..., all_kinds=True)`."""
    sources = [c.train for c in categories]
    names = [c.name for c in categories]
    score = device_program.whole_image_fn(predict, config)
    # Each image at its own (tiling) size, as predict scores it: grouped by size into batches.
    groups: dict[tuple[int, int], list[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault(input_pipeline.eval_image_size(config, sources, [item]), []).append(k)
    maps: list[Any] = [None] * len(items)
    for size, ks in groups.items():
        chosen = [items[k] for k in ks]
        source = input_pipeline.IndexedSource(sources, chosen, size, names, masks=False)
        done = 0
        for _, out in evaluate.predict_items(score, source, config.eval.batch_size, "threshold"):
            kinds = {key: v for key, v in out.items() if key.startswith("raw_")}
            for i in range(len(out["score"])):
                maps[ks[done]] = {key: v[i] for key, v in kinds.items()}
                done += 1
    return maps


def map_statistics(maps: Sequence[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """kind -> {'mean', 'std'} of the pixels of every held-out normal raw map of that kind (the
    standardisation of 'grad+knn'), accumulated in float64."""
    stats = {}
    for key in maps[0]:
        total = count = square = 0.0
        for m in maps:
            x = np.asarray(m[key], np.float64)
            total, square, count = total + x.sum(), square + (x * x).sum(), count + x.size
        mean = total / count
        stats[key[len("raw_") :]] = {
            "mean": float(mean),
            "std": float(np.sqrt(max(square / count - mean * mean, 0.0))),
        }
    return stats


def conformal_thresholds(
    scores: np.ndarray, labels: np.ndarray, names: Sequence[str], alpha: float, warn: bool = True
) -> dict[str, Any]:
    """The decision threshold from held-out normal `scores` (`labels`: each one's class index):
    per class and run-wide, the conformal threshold for the target false-alarm rate `alpha`
    (`inference.conformal`), with the sorted scores behind each (for calibrated values) and
    what each guarantees. A class with too few images for the target gets its largest score
    and a warning naming how many images the target needs."""
    per_category, normal_scores, guarantees = {}, {}, {}
    for c, name in enumerate(names):
        mine = scores[labels == c]
        if not len(mine):
            continue
        t = conformal.conformal_threshold(mine, alpha)
        per_category[name], guarantees[name] = t.value, t.to_json()
        normal_scores[name] = sorted(float(x) for x in mine)
        if warn and not t.reached:
            log.warning(
                "class %s: %d held-out normal images cannot guarantee a %.3g%% false-alarm "
                "rate (it needs %d); its threshold is their largest score, which guarantees "
                "%.3g%%",
                name, t.n, 100 * alpha, t.needed, 100 * t.guarantee,
            )  # fmt: skip
    run = conformal.conformal_threshold(scores, alpha)
    return {
        "image_score": run.value,
        "rule": "conformal",
        "target_false_alarm": float(alpha),
        "num_images": int(len(scores)),
        "per_category": per_category,
        "normal_scores": normal_scores,
        "guarantee": {"run": run.to_json(), "per_category": guarantees},
        "source": "held-out normal training images (never trained on)",
    }


def calibrate_kinds(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    held_items: Sequence[input_pipeline.Item],
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """From the held-out normal images (never trained on): every model kind's map statistics
    and decision threshold. Returns {'threshold': the run's own kind's (None without held-out
    images), 'kinds': {kind: {'threshold': ...}}, 'map_stats': {kind: {'mean', 'std'}} or None}.
    `predict` comes from `make_predict_fn(..., all_kinds=True)`."""
    if not held_items:
        log.info("no held-out images (threshold.holdout_fraction = 0): no decision threshold")
        return {"threshold": None, "kinds": {}, "map_stats": None}
    maps = held_out_maps(predict, categories, held_items, config)
    stats = map_statistics(maps)
    labels = np.array([item.category for item in held_items])
    names = [c.name for c in categories]
    alpha = config.threshold.target_false_alarm
    scored: dict[str, list] = {}
    for m in maps:  # one image at a time: tiled images differ in size
        outputs = {k: v[None] for k, v in m.items()}
        for kind, (score, _) in evaluate.score_kinds(outputs, config, stats).items():
            scored.setdefault(kind, []).append(float(score[0]))
    own = config.model.get("kind", "grad")
    kinds = {
        kind: {"threshold": conformal_thresholds(np.asarray(s), labels, names, alpha, kind == own)}
        for kind, s in scored.items()
    }
    return {"threshold": kinds[own]["threshold"], "kinds": kinds, "map_stats": stats}


def class_centres(variables, cache, train_source, config, mesh) -> dict[str, Any]:
    """Mean pooled backbone feature of each class's training images (nearest-centre class
    recognition at inference), and each class's radius: `threshold.class_margin` times the
    distance of its farthest training image from its centre (its `spread`). At inference an
    image whose nearest centre is farther than that class's radius is an unknown kind of part
    (`grad_jax.inference.decisions`). A class with fewer than `MIN_IMAGES_FOR_RADIUS` images,
    or a margin of 0, gives no radius (None: never rejected). Tiled runs pool per tile, so
    their spread (of single tiles) is wider than that of whole images (the tile mean): their
    radii are generous. From the feature cache when there is one, else one backbone pass.
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
    margin = float(config.threshold.get("class_margin", DEFAULT_CLASS_MARGIN))
    names, centres, counts, spreads, radii = [], [], [], [], []
    for c, name in enumerate(train_source.names):
        mine = pooled[labels == c]
        if len(mine):
            centre = mine.mean(axis=0)
            spread = float(np.linalg.norm(mine - centre, axis=1).max())
            names.append(name)
            centres.append(centre.astype(np.float32).tolist())
            counts.append(len(mine))
            spreads.append(spread)
            radii.append(
                margin * spread if margin > 0 and len(mine) >= MIN_IMAGES_FOR_RADIUS else None
            )
    return {
        "names": names,
        "centres": centres,
        "num_images": counts,
        "spread": spreads,
        "margin": margin,
        "radii": radii,
        "feature": "backbone stage outputs "
        f"{tuple(config.model.out_layers)} averaged over positions, concatenated",
        "distance": "euclidean",
        "rejection": "an image farther from its nearest centre than that class's radius "
        f"(margin {margin:g} x the farthest of its training images from the centre) is an "
        "unknown class",
    }
