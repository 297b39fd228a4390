"""The per-category summary: every metric of one category from one ranking of its pixels
(`evaluate_category`), all categories with their mean and notes (`summarise`), and the metric
table (`format_table`, and the columns the report shares).

The model and the reference evaluation recipe run on device: each anomaly map is smoothed with a
21x21 zero-padded box mean, and each image is scored by the max of a 32x32 'valid' box mean of
the smoothed map. This module receives those already-computed arrays and turns them into
numbers: image-level metrics from the per-image scores, pixel-level metrics from the smoothed
maps pooled over all images of a category.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from grad_jax.evaluation.metrics.ranking import (
    ap_from_counts,
    auroc_from_counts,
    binary_labels,
    cumulative_counts,
    f1_from_counts,
    rank,
)
from grad_jax.evaluation.metrics.regions import aupro_from_ranking, check_maps, label_regions

#: Metrics returned by :func:`evaluate_category`, in table order.
METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "image_ap",
    "pixel_ap",
    "image_f1_max",
    "pixel_f1_max",
    "image_f1_threshold",
    "pixel_f1_threshold",
)
#: Thresholds are in the units of each category's scores: averaging them is meaningless.
_NOT_AVERAGED = ("image_f1_threshold", "pixel_f1_threshold")
#: The metric tables' columns (printed and in the report): (key, title, description).
TABLE_COLUMNS = (
    ("image_auroc", "I-AUROC", "image-level area under the ROC curve"),
    ("pixel_auroc", "P-AUROC", "pixel-level area under the ROC curve"),
    ("pixel_aupro", "P-AUPRO", "pixel-level area under the PRO curve, FPR in [0, 0.3]"),
    ("image_ap", "I-AP", "image-level average precision"),
    ("pixel_ap", "P-AP", "pixel-level average precision"),
    ("image_f1_max", "I-F1max", "image-level best F1 over all thresholds"),
    ("pixel_f1_max", "P-F1max", "pixel-level best F1 over all thresholds"),
)
#: Columns shown only when some category has the metric.
OPTIONAL_COLUMNS = (
    (
        "false_alarm_rate",
        "FAR@thr",
        "share of good test images at or above the decision threshold (false alarms)",
    ),
)
#: How an undefined (nan) metric is written in tables and metrics.json.
NOT_AVAILABLE = "n/a"


#: The figures that compare model kinds (grad, knn, grad+knn) on one split: (key, title); a
#: kind's row shows their means over classes ('mean/<key>').
KIND_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_aupro", "AUPRO"),
    ("false_alarm_rate", "false alarms (measured)"),
    ("false_alarm_guarantee", "false alarms (guaranteed)"),
    ("miss_rate", "misses"),
)


@dataclass
class CategoryResults:
    """Everything needed to evaluate one category.

    Attributes:
      scores: ``[N]`` image anomaly scores.
      labels: ``[N]`` 0/1 image labels; pass ``masks.reshape(N, -1).any(-1)`` (an image is
        anomalous iff its mask has a positive pixel), as the reference does.
      maps: ``[N, H, W]`` smoothed anomaly maps.
      masks: ``[N, H, W]`` 0/1 or bool ground-truth masks.
      has_mask: ``[N]`` bool, False for images whose mask is unknown (a defect folder without
        ``ground_truth/``): pixel metrics leave them out. None: every mask is known.
    """

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray | None = None


def evaluate_category(
    image_scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    has_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """All image- and pixel-level metrics of one category.

    Pixel metrics pool every pixel of every image of the category (not a per-image mean). All of
    them come from a single ranking of the pooled pixels, so the category costs one sort.

    Args:
      image_scores: ``[N]`` image anomaly scores.
      labels: ``[N]`` 0/1 image labels. Callers pass ``masks.reshape(N, -1).any(-1)`` (the
        reference defines an image as anomalous iff its mask has a positive pixel); this is not
        recomputed here so that image metrics only depend on what the caller chose.
      maps: ``[N, H, W]`` smoothed anomaly maps.
      masks: ``[N, H, W]`` 0/1 or bool ground truth.
      has_mask: ``[N]`` bool or None (all True). Pixel metrics pool only the images whose mask
        is known; image metrics use every image. With no known mask of a defective image the
        pixel metrics are nan (not available).

    Returns:
      ``image_auroc``, ``pixel_auroc``, ``pixel_aupro`` (FPR <= 0.3), ``image_ap``, ``pixel_ap``,
      ``image_f1_max``, ``pixel_f1_max``, ``image_f1_threshold``, ``pixel_f1_threshold`` as
      floats in [0, 1] (thresholds in score units); nan where undefined. No AUROC is mirrored.
    """
    image_scores = np.asarray(image_scores)
    labels = np.asarray(labels)
    if image_scores.ndim != 1 or labels.shape != image_scores.shape:
        raise ValueError(
            f"image_scores {image_scores.shape} and labels {labels.shape} must both be [N]"
        )
    maps = check_maps(masks, maps)
    if maps.ndim != 3 or maps.shape[0] != image_scores.shape[0]:
        raise ValueError(f"maps/masks must be [N={image_scores.shape[0]}, H, W], got {maps.shape}")

    image = rank(image_scores, binary_labels(labels, "labels"))
    image_tp, image_fp = cumulative_counts(image)
    image_f1, image_thr = f1_from_counts(image_tp, image_fp, image.thresholds)

    if has_mask is not None:
        has_mask = np.asarray(has_mask, bool)
        if has_mask.shape != labels.shape:
            raise ValueError(f"has_mask {has_mask.shape} must be [N={labels.shape[0]}]")
        if not has_mask.all():
            maps, masks = maps[has_mask], np.asarray(masks)[has_mask]
    region_ids, n_regions = label_regions(masks)
    pixel = rank(maps, region_ids)
    del region_ids
    pixel_tp, pixel_fp = cumulative_counts(pixel)
    pixel_f1, pixel_thr = f1_from_counts(pixel_tp, pixel_fp, pixel.thresholds)

    return {
        "image_auroc": auroc_from_counts(image_tp, image_fp),
        "pixel_auroc": auroc_from_counts(pixel_tp, pixel_fp),
        "pixel_aupro": aupro_from_ranking(pixel, n_regions, 0.3, pixel_tp, pixel_fp),
        "image_ap": ap_from_counts(image_tp, image_fp),
        "pixel_ap": ap_from_counts(pixel_tp, pixel_fp),
        "image_f1_max": image_f1,
        "pixel_f1_max": pixel_f1,
        "image_f1_threshold": image_thr,
        "pixel_f1_threshold": pixel_thr,
    }


def summarise(results: dict[str, CategoryResults]) -> tuple[dict[str, float], list[str]]:
    """Evaluates every category and averages them.

    Args:
      results: category name -> :class:`CategoryResults`, in the order wanted for reports.

    Returns:
      ``(metrics, notes)``. ``metrics`` is flat: ``"<category>/<metric>"`` for every key of
      :func:`evaluate_category`, then ``"mean/<metric>"``, the unweighted mean over categories
      (each category counts once, as in the papers' tables, whatever its test-set size), skipping
      nan entries; thresholds are not averaged (their units differ per category). ``notes`` are
      human-readable remarks: undefined metrics, image labels that disagree with the masks, and
      every AUROC below 0.5. Such an AUROC is kept: the reference code would report
      ``1 - value`` instead, which turns a detector that ranks anomalies *below* normal samples
      into an apparently good one; here the reader sees the real value and the note.
    """
    if "mean" in results:
        raise ValueError("'mean' is reserved for the average row; rename that category")
    metrics: dict[str, float] = {}
    notes: list[str] = []
    for category, res in results.items():
        values, category_notes = _summarise_category(category, res)
        metrics.update(values)
        notes += category_notes
    for key in METRIC_KEYS:
        if key in _NOT_AVERAGED:
            continue
        values = [metrics[f"{c}/{key}"] for c in results]
        finite = [v for v in values if not math.isnan(v)]
        metrics[f"mean/{key}"] = float(np.mean(finite)) if finite else math.nan
        if finite and len(finite) < len(values):
            notes.append(
                f"mean/{key} averages {len(finite)} of {len(values)} categories (nan skipped)"
            )
    return metrics, notes


def _summarise_category(category: str, res: CategoryResults) -> tuple[dict[str, float], list[str]]:
    """``"<category>/<metric>"`` values of one category, and the notes about them."""
    masks = np.asarray(res.masks)
    labels = np.asarray(res.labels)
    known = np.ones(labels.shape, bool) if res.has_mask is None else np.asarray(res.has_mask, bool)
    values = evaluate_category(res.scores, labels, res.maps, masks, known)
    notes = []
    from_masks = masks.reshape(masks.shape[0], -1).any(axis=1)
    mismatched = int(np.count_nonzero((from_masks != (labels != 0)) & known))
    if mismatched:
        notes.append(
            f"{category}: {mismatched} image label(s) disagree with 'mask has a positive "
            "pixel', the reference's definition of an anomalous image"
        )
    if not known.all():
        unknown = int(np.count_nonzero(~known))
        notes.append(
            f"{category}: {unknown} defective test image(s) have no mask: image metrics use "
            f"their folder label, pixel metrics use the other {int(known.sum())} image(s)"
        )
    masked_defect = bool((known & (labels != 0)).any())
    for key, value in values.items():
        if key in _NOT_AVERAGED:
            continue
        if math.isnan(value):
            why = (
                "no defective test image has a mask"
                if key.startswith("pixel_") and not masked_defect
                else "a class is absent"
            )
            notes.append(f"{category}/{key} is nan, reported as n/a ({why})")
        elif key.endswith("auroc") and value < 0.5:
            notes.append(
                f"{category}/{key} = {value:.4f} < 0.5: the reference code would have "
                f"reported 1 - value = {1.0 - value:.4f} (flip not applied)"
            )
    return {f"{category}/{key}": value for key, value in values.items()}, notes


def format_table(metrics: dict[str, float]) -> str:
    """Formats the output of :func:`summarise` as an aligned plain-text table.

    One row per category (in the order of ``metrics``) and the ``mean`` row last; the main metrics
    as percentages with one decimal; ``-`` for a missing metric and ``n/a`` for an undefined one
    (e.g. pixel metrics of a category without masks). The false-alarm rate at the decision
    threshold gets a column when some category has it.
    """
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        category, _, metric = key.rpartition("/")
        rows.setdefault(category, {})[metric] = value
    if "mean" in rows:
        rows["mean"] = rows.pop("mean")

    def cell(row: dict[str, float], metric: str) -> str:
        if metric not in row:
            return "-"
        value = row[metric]
        return NOT_AVAILABLE if math.isnan(value) else f"{100.0 * value:.1f}"

    columns = list(TABLE_COLUMNS)
    columns += [c for c in OPTIONAL_COLUMNS if any(c[0] in row for row in rows.values())]
    header = ["category"] + [title for _, title, _ in columns]
    body = [[name] + [cell(row, m) for m, _, _ in columns] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)
