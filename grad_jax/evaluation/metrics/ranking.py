"""Ranking-based metrics: one descending sort of the scores with tied scores collapsed, and the
metrics read from it (AUROC, average precision, F1-max, the ROC curve, the false-alarm rate).

Every metric here is a function of the descending-score ranking of the samples, with tied scores
collapsed into a single threshold (a threshold ``t`` declares ``score >= t`` anomalous, so equal
scores always move together). The ranking is the expensive step: a category of 600 images at
224x224 is 30M pixels, so it is computed once (see :func:`rank`) and every metric derived from
it with cumulative sums, without Python loops over pixels or thresholds. Counts are kept in int64
and weighted sums in float64. `regions` (PRO) and `summary` (a category's metrics) build on
`rank`, `cumulative_counts` and the ``*_from_counts`` functions.

Definitions follow scikit-learn (AUROC, average precision); scikit-learn is only used by the
tests as a reference, never at runtime.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------------
# Ranking: one sort, ties collapsed.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
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


def rank(scores: np.ndarray, payload: np.ndarray) -> Ranking:
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
    return Ranking(ends=ends, thresholds=thresholds, payload=sorted_payload)


def binary_labels(labels: np.ndarray, name: str) -> np.ndarray:
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


def cumulative_counts(ranking: Ranking) -> tuple[np.ndarray, np.ndarray]:
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


def auroc_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
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


def ap_from_counts(tp: np.ndarray, fp: np.ndarray) -> float:
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


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
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
    tp, fp = cumulative_counts(rank(scores, binary_labels(labels, "labels")))
    return auroc_from_counts(tp, fp)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (same value as sklearn's ``average_precision_score``).

    Args:
      labels: ``[...]`` 0/1 or bool ground truth, 1 = anomalous.
      scores: ``[...]`` (same size) anomaly scores.

    Returns:
      ``sum_t (R_t - R_{t-1}) P_t`` over the distinct thresholds in decreasing order; nan if
      there are no positives.
    """
    tp, fp = cumulative_counts(rank(scores, binary_labels(labels, "labels")))
    return ap_from_counts(tp, fp)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 score over every threshold, and that threshold.

    Args:
      labels: ``[...]`` 0/1 or bool ground truth, 1 = anomalous.
      scores: ``[...]`` (same size) anomaly scores.

    Returns:
      ``(f1, threshold)`` where predicting ``score >= threshold`` as anomalous achieves ``f1``;
      the threshold is one of the scores. ``(nan, nan)`` if there are no positives.
    """
    ranking = rank(scores, binary_labels(labels, "labels"))
    tp, fp = cumulative_counts(ranking)
    return f1_from_counts(tp, fp, ranking.thresholds)


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
    tp, fp = cumulative_counts(rank(scores, binary_labels(labels, "labels")))
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


def false_alarm_rate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Share of the normal images (label 0) flagged at ``threshold`` (``score >= threshold``).

    nan if there is no normal image.
    """
    normal = np.asarray(labels) == 0
    if not normal.any():
        return math.nan
    return float(np.mean(np.asarray(scores, np.float64)[normal] >= threshold))


def miss_rate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Share of the defective images (label 1) passed at ``threshold`` (``score < threshold``).

    nan if there is no defective image.
    """
    defective = np.asarray(labels) != 0
    if not defective.any():
        return math.nan
    return float(np.mean(np.asarray(scores, np.float64)[defective] < threshold))
