"""Host-side (numpy) evaluation metrics for anomaly detection.

The model and the reference evaluation recipe run on device: each 224x224 anomaly map is smoothed
with a 21x21 zero-padded box mean, and each image is scored by the max of a 32x32 'valid' box mean
of the smoothed map. This module receives those already-computed arrays and turns them into
numbers: image-level metrics from the per-image scores, pixel-level metrics from the smoothed maps
pooled over all images of a category.

Every metric here is a function of the descending-score ranking of the samples, with tied scores
collapsed into a single threshold (a threshold ``t`` declares ``score >= t`` anomalous, so equal
scores always move together). The ranking is the expensive step: a category of 600 images at
224x224 is 30M pixels, so it is computed once (see :func:`_rank`) and every pixel metric of
:func:`evaluate_category` is derived from it with cumulative sums, without Python loops over
pixels or thresholds. Counts are kept in int64 and weighted sums in float64.

Definitions follow scikit-learn (AUROC, average precision) and MVTec AD (AUPRO); scikit-learn is
only used by the tests as a reference, never at runtime.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "CategoryResults",
    "aupro",
    "auroc",
    "average_precision",
    "evaluate",
    "evaluate_category",
    "f1_max",
    "false_alarm_rate",
    "format_table",
    "pro_curve",
    "pro_curve_is_sampled",
    "roc_curve",
]

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

# --------------------------------------------------------------------------------------------
# Ranking: one sort, ties collapsed.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranking:
    """Samples sorted by descending score, with tied scores grouped.

    Attributes:
      ends: ``[G]`` int64, exclusive end (in sorted order) of each group of equal scores; the
        number of samples with ``score >= thresholds[g]`` is ``ends[g]``.
      thresholds: ``[G]`` float64, the distinct scores, strictly decreasing.
      payload: ``[M]`` non-negative ints, the per-sample payload (a binary label or a region id)
        permuted into the sorted order.
    """

    ends: np.ndarray
    thresholds: np.ndarray
    payload: np.ndarray


def _as_float32_exactly(x: np.ndarray) -> np.ndarray | None:
    """Returns ``x`` as float32 if that conversion is lossless (so the order and ties are kept)."""
    if x.dtype in (np.float32, np.float16, np.bool_, np.uint8, np.int8, np.uint16, np.int16):
        return x.astype(np.float32, copy=False)
    if x.dtype == np.float64:
        with np.errstate(over="ignore", invalid="ignore"):
            x32 = x.astype(np.float32)
        if np.array_equal(x32, x):
            return x32
    return None


def _float32_descending_key(x: np.ndarray) -> np.ndarray:
    """Maps float32 to uint32 so that unsigned order equals *descending* float order.

    The IEEE bit pattern of a non-negative float is ordered like an unsigned int and that of a
    negative float backwards. XOR-ing the 31 value bits of non-negatives (and leaving negatives
    alone) reverses the first range and puts it below the second. The map is an involution, so
    :func:`_float32_from_descending_key` is the same operation.
    """
    u = (x + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 == +0.0: the two zeros must tie.
    key = u >> np.uint32(31)
    key -= np.uint32(1)  # sign 0 -> 0xFFFFFFFF, sign 1 -> 0
    key &= np.uint32(0x7FFFFFFF)
    key ^= u
    return key


def _float32_from_descending_key(key: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_float32_descending_key`."""
    key = np.asarray(key, dtype=np.uint32)
    mask = (key >> np.uint32(31)) - np.uint32(1)
    mask &= np.uint32(0x7FFFFFFF)
    return (key ^ mask).view(np.float32)


def _group_ends(changes: np.ndarray) -> np.ndarray:
    """Exclusive ends ``[G]`` (int64) of runs of equal values, given ``s[1:] != s[:-1]``."""
    starts = np.flatnonzero(changes)
    ends = np.empty(starts.size + 1, dtype=np.int64)
    np.add(starts, 1, out=ends[:-1])
    ends[-1] = changes.size + 1
    return ends


def _rank(scores: np.ndarray, payload: np.ndarray) -> _Ranking:
    """Sorts ``scores`` (any shape, flattened) descending and carries ``payload`` along.

    Why not just ``argsort``: an argsort of 30M floats takes ~3 s, while sorting 64-bit words
    holding the score's key in the high half and the payload (< 2**32) in the low half takes
    ~0.3 s and yields both the sorted scores and the permuted payload without gathers. That path
    is used whenever the scores are exactly representable in float32 (the model's maps are);
    other inputs fall back to an argsort. Within a group of tied scores the payload order is
    arbitrary, which is fine because every metric only looks at group totals.
    """
    scores = np.asarray(scores).ravel()
    payload = np.asarray(payload).ravel()
    if scores.size == 0:
        raise ValueError("metrics need at least one sample")
    if scores.shape != payload.shape:
        raise ValueError(f"scores has {scores.size} elements but labels have {payload.size}")
    if not np.issubdtype(scores.dtype, np.number) and scores.dtype != np.bool_:
        raise TypeError(f"scores must be numeric, got {scores.dtype}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN; the ranking (and every metric) would be undefined")

    x32 = _as_float32_exactly(scores)
    if x32 is not None:
        packed = np.empty(scores.size, dtype=np.uint64)
        halves = packed.view(np.uint32).reshape(-1, 2)  # [low, high] words on little endian
        low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
        halves[:, low] = payload
        halves[:, high] = _float32_descending_key(x32)
        del x32
        packed.sort()
        keys = halves[:, high]
        ends = _group_ends(keys[1:] != keys[:-1])
        thresholds = _float32_from_descending_key(keys[ends - 1]).astype(np.float64)
        sorted_payload = halves[:, low].copy()
    else:
        order = np.argsort(scores)[::-1]
        sorted_scores = scores[order]
        sorted_payload = payload[order]
        del order
        ends = _group_ends(sorted_scores[1:] != sorted_scores[:-1])
        thresholds = sorted_scores[ends - 1].astype(np.float64)
    return _Ranking(ends=ends, thresholds=thresholds, payload=sorted_payload)


def _binary(labels: np.ndarray, name: str) -> np.ndarray:
    """Validates 0/1 (or bool) labels and returns them as uint8.

    Anything else (e.g. 0/255 masks or interpolated masks) is rejected instead of being silently
    thresholded, because such inputs usually mean a preprocessing bug.
    """
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        return labels.view(np.uint8)
    if not (np.issubdtype(labels.dtype, np.number)):
        raise TypeError(f"{name} must be bool or numeric 0/1, got {labels.dtype}")
    if np.any((labels != 0) & (labels != 1)):
        raise ValueError(f"{name} must contain only 0 and 1")
    return labels.astype(np.uint8)


def _cumulative_counts(ranking: _Ranking) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true/false positives ``[G]`` at each threshold (payload > 0 is positive)."""
    positive = ranking.payload != 0
    # int32 running counts halve the memory traffic of the 30M-long cumsum when they cannot wrap.
    dtype = np.int32 if positive.size < 2**31 else np.int64
    tp = np.cumsum(positive, dtype=dtype)[ranking.ends - 1].astype(np.int64)
    fp = ranking.ends - tp
    return tp, fp


# --------------------------------------------------------------------------------------------
# Binary metrics from cumulative counts.
# --------------------------------------------------------------------------------------------


def _auroc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Exact ROC AUC with ties, i.e. the trapezoidal area under the tie-collapsed ROC curve.

    Equivalently the Mann-Whitney statistic P(s_pos > s_neg) + P(s_pos == s_neg) / 2. Computed in
    integers: each group of ``d_fp`` negatives and ``d_tp`` positives adds a trapezoid of twice
    the area ``d_fp * (2 * tp_before + d_tp)`` (units of 1 / (2 P N)); the total is at most
    ``2 P N``, exact in int64 for any realistic size.
    """
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    if n_pos == 0 or n_neg == 0:
        return math.nan
    d_tp = np.diff(tp, prepend=0)
    d_fp = np.diff(fp, prepend=0)
    twice_area = int(np.dot(d_fp, 2 * tp - d_tp))  # 2 * tp_before + d_tp == 2 * tp - d_tp
    return twice_area / (2.0 * n_pos * n_neg)


def _ap_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall increment) x precision (no interpolation).

    This is scikit-learn's step-wise definition, not the trapezoidal area under the PR curve
    (which is optimistic). nan if there are no positives (recall undefined).
    """
    n_pos = int(tp[-1])
    if n_pos == 0:
        return math.nan
    d_tp = np.diff(tp, prepend=0)
    precision = tp / (tp + fp)
    return float(np.dot(d_tp, precision) / n_pos)


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """Best F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P) over the distinct thresholds.

    On equal F1 the highest threshold wins (first in descending order).
    """
    n_pos = int(tp[-1])
    if n_pos == 0:
        return math.nan, math.nan
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------------------------
# Public binary metrics.
# --------------------------------------------------------------------------------------------


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact area under the ROC curve, with ties (same value as sklearn's ``roc_auc_score``).

    Args:
      labels: ``[...]`` 0/1 or bool ground truth, 1 = anomalous.
      scores: ``[...]`` (same size) anomaly scores, higher = more anomalous.

    Returns:
      The AUROC in [0, 1], or nan if only one class is present. A value below 0.5 is returned as
      is: it means the scores rank normal samples above anomalous ones, and mirroring it
      (``1 - auc``) would hide that failure and report a better-than-chance detector.
    """
    tp, fp = _cumulative_counts(_rank(scores, _binary(labels, "labels")))
    return _auroc_from_counts(tp, fp)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (same value as sklearn's ``average_precision_score``).

    Args:
      labels: ``[...]`` 0/1 or bool ground truth, 1 = anomalous.
      scores: ``[...]`` (same size) anomaly scores.

    Returns:
      ``sum_t (R_t - R_{t-1}) P_t`` over the distinct thresholds in decreasing order; nan if
      there are no positives.
    """
    tp, fp = _cumulative_counts(_rank(scores, _binary(labels, "labels")))
    return _ap_from_counts(tp, fp)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 score over every threshold, and that threshold.

    Args:
      labels: ``[...]`` 0/1 or bool ground truth, 1 = anomalous.
      scores: ``[...]`` (same size) anomaly scores.

    Returns:
      ``(f1, threshold)`` where predicting ``score >= threshold`` as anomalous achieves ``f1``;
      the threshold is one of the scores. ``(nan, nan)`` if there are no positives.
    """
    ranking = _rank(scores, _binary(labels, "labels"))
    tp, fp = _cumulative_counts(ranking)
    return _f1_from_counts(tp, fp, ranking.thresholds)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve for plotting.

    Args:
      labels: ``[...]`` 0/1 or bool ground truth, 1 = anomalous.
      scores: ``[...]`` (same size) anomaly scores.

    Returns:
      ``(fpr, tpr)``, each ``[G + 1]`` float64 for ``G`` distinct scores: ``(0, 0)`` then one
      point per threshold in decreasing order, ending at ``(1, 1)``; both non-decreasing. A rate
      whose class is absent is all nan.
    """
    tp, fp = _cumulative_counts(_rank(scores, _binary(labels, "labels")))
    return _rates(fp), _rates(tp)


def _rates(counts: np.ndarray) -> np.ndarray:
    total = counts[-1]
    out = np.empty(counts.size + 1, dtype=np.float64)
    if total == 0:
        out.fill(np.nan)
        return out
    out[0] = 0.0
    np.divide(counts, total, out=out[1:])
    return out


# --------------------------------------------------------------------------------------------
# PRO / AUPRO.
# --------------------------------------------------------------------------------------------

# 8-connectivity inside each image and no connection between images of the stack.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the ground-truth regions of a ``[N, H, W]`` mask stack.

    Regions are the 8-connected components of each image's mask (MVTec AD's definition). One 3-D
    ``ndimage.label`` call whose structuring element only connects within a plane gives the same
    components as labelling each image separately, with ids unique across the stack.

    Returns:
      ``(region_ids, n_regions)``: ``[N, H, W]`` ids, 0 for normal pixels, 1..n for regions.
    """
    masks = _binary(masks, "masks")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or [H, W], got shape {masks.shape}")
    region_ids, n_regions = ndimage.label(masks, structure=_STACK_STRUCTURE)
    return region_ids, int(n_regions)


def _pro_values(ranking: _Ranking, n_regions: int, tp: np.ndarray) -> np.ndarray:
    """PRO after each of the first ``tp.size`` tie groups of the ranking.

    An anomalous pixel of region ``r`` contributes ``1 / (n_regions * size_r)`` to PRO, so PRO at
    a threshold is the running sum of those weights over the ranking. ``tp[g]`` is the number of
    anomalous pixels up to the end of group ``g`` (:func:`_cumulative_counts`); the weights are
    only gathered for the (usually few) anomalous pixels, in ranking order, and their running sum
    is read after the first ``tp[g]`` of them.
    """
    anomalous_ids = ranking.payload[ranking.payload != 0]
    sizes = np.bincount(anomalous_ids, minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (n_regions * sizes[1:])
    running = np.zeros(anomalous_ids.size + 1, dtype=np.float64)
    np.cumsum(weight[anomalous_ids], out=running[1:])
    return running[tp]


def _normalised_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoidal area under ``pro(fpr)`` on ``[0, fpr_limit]``, divided by ``fpr_limit``.

    ``fpr``/``pro`` are the curve's points *after* its (0, 0) start, which is added here; ``fpr``
    is non-decreasing (repeated values are vertical steps, which add no area). The curve is cut at
    ``fpr_limit`` with the value there interpolated linearly between the neighbouring points, so
    the result does not depend on where thresholds happen to fall. Points past the first one
    beyond the limit are not needed.
    """
    n_in = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x = np.zeros(n_in + 2, dtype=np.float64)
    y = np.zeros(n_in + 2, dtype=np.float64)
    x[1:-1], y[1:-1] = fpr[:n_in], pro[:n_in]
    if n_in < fpr.size and x[-2] < fpr_limit:
        x0, y0, x1, y1 = x[-2], y[-2], fpr[n_in], pro[n_in]
        x[-1], y[-1] = fpr_limit, y0 + (fpr_limit - x0) * (y1 - y0) / (x1 - x0)
    else:  # the curve reaches fpr_limit exactly
        x, y = x[:-1], y[:-1]
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
    return area / fpr_limit


def _aupro_from_ranking(
    ranking: _Ranking, n_regions: int, fpr_limit: float, tp: np.ndarray, fp: np.ndarray
) -> float:
    """AUPRO from a ranking whose payload is region ids; ``tp``/``fp`` as in
    :func:`_cumulative_counts` (anomalous/normal pixel counts, normal pixels give FPR)."""
    n_normal = int(fp[-1])
    if n_regions == 0 or n_normal == 0:
        return math.nan
    fpr = fp / n_normal
    keep = min(int(np.searchsorted(fpr, fpr_limit, side="right")) + 1, fpr.size)
    return _normalised_area(fpr[:keep], _pro_values(ranking, n_regions, tp[:keep]), fpr_limit)


def _check_maps(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    maps = np.asarray(maps)
    if np.shape(masks) != maps.shape:
        raise ValueError(f"masks {np.shape(masks)} and maps {maps.shape} differ in shape")
    return maps


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve for FPR in ``[0, fpr_limit]``.

    PRO weights every ground-truth region equally, whatever its size, so unlike pixel AUROC a
    detector cannot score well by only finding the large defects. For a threshold ``t``:
    ``PRO(t)`` is the mean over all regions of all images of the fraction of the region's pixels
    with ``map >= t``, and ``FPR(t)`` the fraction of normal pixels (mask 0, all images) with
    ``map >= t``. The curve starts at (0, 0), is integrated with the trapezoid rule up to
    ``fpr_limit`` (value there interpolated) and divided by ``fpr_limit``, so a perfect map scores
    1.0 and a constant map ``fpr_limit / 2``.

    Args:
      masks: ``[N, H, W]`` (or ``[H, W]``) 0/1 or bool ground truth; regions are the 8-connected
        components of each image's mask.
      maps: same shape, anomaly maps.
      fpr_limit: upper end of the integration range, in ``(0, 1]``.

    Returns:
      The normalised AUPRO, or nan if there is no anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps = _check_maps(masks, maps)
    region_ids, n_regions = _regions(masks)
    ranking = _rank(maps, region_ids)
    del region_ids
    return _aupro_from_ranking(ranking, n_regions, fpr_limit, *_cumulative_counts(ranking))


def pro_curve_is_sampled(num_pixels: int, max_pixels: int | None) -> bool:
    """Whether :func:`pro_curve` estimates the curve of ``num_pixels`` pixels from a sample."""
    return max_pixels is not None and num_pixels > max_pixels


def _sample_pixels(
    region_ids: np.ndarray, maps: np.ndarray, max_pixels: int, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """A seeded uniform sample of about ``max_pixels`` pixels, drawn within each class.

    Every anomalous pixel is kept if they fit in half the budget (else each with probability
    ``(max_pixels // 2) / n_anomalous``); normal pixels fill the rest of the budget. Needs at
    least one pixel of each class.

    Args:
      region_ids: ``[N, H, W]`` region ids of :func:`_regions` (0: normal pixel).
      maps: same shape, anomaly maps.

    Returns:
      ``(region_ids, values, n_regions)``: ``[M]`` ids of the kept pixels renumbered 1..n over
      the regions that kept a pixel (0 still normal), ``[M]`` their map values, and that n.
    """
    region_ids, values = region_ids.ravel(), maps.ravel()
    n_anomalous = int(np.count_nonzero(region_ids))
    n_normal = region_ids.size - n_anomalous
    keep_anomalous = min(n_anomalous, max_pixels // 2)
    keep_normal = min(n_normal, max_pixels - keep_anomalous)
    draw = np.random.default_rng(seed).random(region_ids.size, dtype=np.float32)
    rate = np.where(region_ids != 0, keep_anomalous / n_anomalous, keep_normal / n_normal)
    keep = draw < rate
    del draw, rate
    region_ids, values = region_ids[keep], values[keep]
    present = np.bincount(region_ids, minlength=1) > 0
    present[0] = False
    renumber = np.zeros(present.size, dtype=region_ids.dtype)
    renumber[present] = np.arange(1, np.count_nonzero(present) + 1)
    return renumber[region_ids], values, int(np.count_nonzero(present))


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, max_pixels: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The full PRO curve for plotting (see :func:`aupro` for the definitions).

    Args:
      masks: ``[N, H, W]`` (or ``[H, W]``) 0/1 or bool ground truth.
      maps: same shape, anomaly maps.
      max_pixels: None: every pixel counts. Otherwise a stack of more pixels than this (see
        :func:`pro_curve_is_sampled`) gives an estimate of the curve, for speed, from a seeded
        uniform sample of about ``max_pixels`` pixels drawn within each class: all anomalous
        pixels if they fit in half the budget (else a uniform half-budget sample), normal pixels
        filling the rest. Region sizes, PRO and FPR are then fractions of the sample, and the
        regions are those that kept a pixel. For plots only: :func:`aupro` uses every pixel.
      seed: seed of the sample's generator.

    Returns:
      ``(fpr, pro)``, each ``[G + 1]`` float64 for ``G`` distinct map values (of the sample):
      ``(0, 0)`` then one point per threshold in decreasing order, ending at ``(1, 1)`` up to
      rounding; both non-decreasing. Both all nan if there is no region or no normal pixel.
    """
    maps = _check_maps(masks, maps)
    region_ids, n_regions = _regions(masks)
    n_normal = region_ids.size - int(np.count_nonzero(region_ids))
    if n_regions and n_normal and pro_curve_is_sampled(region_ids.size, max_pixels):
        region_ids, maps, n_regions = _sample_pixels(region_ids, maps, max_pixels, seed)
        if region_ids.size == 0:  # a budget so small that nothing was drawn: no curve
            return np.full(1, np.nan), np.full(1, np.nan)
    ranking = _rank(maps, region_ids)
    del region_ids
    tp, fp = _cumulative_counts(ranking)
    n_normal = int(fp[-1])
    fpr = np.zeros(tp.size + 1, dtype=np.float64)
    pro = np.zeros(tp.size + 1, dtype=np.float64)
    if n_regions == 0 or n_normal == 0:
        fpr.fill(np.nan)
        pro.fill(np.nan)
    else:
        np.divide(fp, n_normal, out=fpr[1:])
        pro[1:] = _pro_values(ranking, n_regions, tp)
    return fpr, pro


# --------------------------------------------------------------------------------------------
# Per-category and whole-dataset evaluation.
# --------------------------------------------------------------------------------------------


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
    maps = _check_maps(masks, maps)
    if maps.ndim != 3 or maps.shape[0] != image_scores.shape[0]:
        raise ValueError(f"maps/masks must be [N={image_scores.shape[0]}, H, W], got {maps.shape}")

    image = _rank(image_scores, _binary(labels, "labels"))
    image_tp, image_fp = _cumulative_counts(image)
    image_f1, image_thr = _f1_from_counts(image_tp, image_fp, image.thresholds)

    if has_mask is not None:
        has_mask = np.asarray(has_mask, bool)
        if has_mask.shape != labels.shape:
            raise ValueError(f"has_mask {has_mask.shape} must be [N={labels.shape[0]}]")
        if not has_mask.all():
            maps, masks = maps[has_mask], np.asarray(masks)[has_mask]
    region_ids, n_regions = _regions(masks)
    pixel = _rank(maps, region_ids)
    del region_ids
    pixel_tp, pixel_fp = _cumulative_counts(pixel)
    pixel_f1, pixel_thr = _f1_from_counts(pixel_tp, pixel_fp, pixel.thresholds)

    return {
        "image_auroc": _auroc_from_counts(image_tp, image_fp),
        "pixel_auroc": _auroc_from_counts(pixel_tp, pixel_fp),
        "pixel_aupro": _aupro_from_ranking(pixel, n_regions, 0.3, pixel_tp, pixel_fp),
        "image_ap": _ap_from_counts(image_tp, image_fp),
        "pixel_ap": _ap_from_counts(pixel_tp, pixel_fp),
        "image_f1_max": image_f1,
        "pixel_f1_max": pixel_f1,
        "image_f1_threshold": image_thr,
        "pixel_f1_threshold": pixel_thr,
    }


def false_alarm_rate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Share of the normal images (label 0) flagged at ``threshold`` (``score >= threshold``).

    nan if there is no normal image.
    """
    normal = np.asarray(labels) == 0
    if not normal.any():
        return math.nan
    return float(np.mean(np.asarray(scores, np.float64)[normal] >= threshold))


def evaluate(results: dict[str, CategoryResults]) -> tuple[dict[str, float], list[str]]:
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
        masks = np.asarray(res.masks)
        labels = np.asarray(res.labels)
        known = (
            np.ones(labels.shape, bool) if res.has_mask is None else np.asarray(res.has_mask, bool)
        )
        values = evaluate_category(res.scores, labels, res.maps, masks, known)
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
        for key, value in values.items():
            metrics[f"{category}/{key}"] = value
            if key in _NOT_AVERAGED:
                continue
            if math.isnan(value):
                if key.startswith("pixel_") and not (known & (labels != 0)).any():
                    why = "no defective test image has a mask"
                else:
                    why = "a class is absent"
                notes.append(f"{category}/{key} is nan, reported as n/a ({why})")
            elif key.endswith("auroc") and value < 0.5:
                notes.append(
                    f"{category}/{key} = {value:.4f} < 0.5: the reference code would have "
                    f"reported 1 - value = {1.0 - value:.4f} (flip not applied)"
                )
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


def format_table(metrics: dict[str, float]) -> str:
    """Formats the output of :func:`evaluate` as an aligned plain-text table.

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
