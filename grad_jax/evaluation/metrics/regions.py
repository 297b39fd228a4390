"""Region-based metrics: the per-region-overlap (PRO) curve and its normalised area (AUPRO),
over the 8-connected defect regions of a mask stack, and the pixel sampling of plotted curves.

They rank pixels with the payload of each pixel's region id (`ranking.rank`), so normal pixels
give the false-positive rate and each region counts once, whatever its size. Definitions follow
MVTec AD.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from grad_jax.evaluation.metrics.ranking import Ranking, binary_labels, cumulative_counts, rank

# --------------------------------------------------------------------------------------------
# PRO / AUPRO.
# --------------------------------------------------------------------------------------------

# 8-connectivity inside each image and no connection between images of the stack.
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = True


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the ground-truth regions of a ``[N, H, W]`` mask stack.

    Regions are the 8-connected components of each image's mask (MVTec AD's definition). One 3-D
    ``ndimage.label`` call whose structuring element only connects within a plane gives the same
    components as labelling each image separately, with ids unique across the stack.

    Returns:
      ``(region_ids, n_regions)``: ``[N, H, W]`` ids, 0 for normal pixels, 1..n for regions.
    """
    masks = binary_labels(masks, "masks")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or [H, W], got shape {masks.shape}")
    region_ids, n_regions = ndimage.label(masks, structure=_STACK_STRUCTURE)
    return region_ids, int(n_regions)


def _pro_values(ranking: Ranking, n_regions: int, tp: np.ndarray) -> np.ndarray:
    """PRO after each of the first ``tp.size`` tie groups of the ranking.

    An anomalous pixel of region ``r`` contributes ``1 / (n_regions * size_r)`` to PRO, so PRO at
    a threshold is the running sum of those weights over the ranking. ``tp[g]`` is the number of
    anomalous pixels up to the end of group ``g`` (:func:`cumulative_counts`); the weights are
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


def aupro_from_ranking(
    ranking: Ranking, n_regions: int, fpr_limit: float, tp: np.ndarray, fp: np.ndarray
) -> float:
    """AUPRO from a ranking whose payload is region ids; ``tp``/``fp`` as in
    :func:`cumulative_counts` (anomalous/normal pixel counts, normal pixels give FPR)."""
    n_normal = int(fp[-1])
    if n_regions == 0 or n_normal == 0:
        return math.nan
    fpr = fp / n_normal
    keep = min(int(np.searchsorted(fpr, fpr_limit, side="right")) + 1, fpr.size)
    return _normalised_area(fpr[:keep], _pro_values(ranking, n_regions, tp[:keep]), fpr_limit)


def check_maps(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
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
    maps = check_maps(masks, maps)
    region_ids, n_regions = label_regions(masks)
    ranking = rank(maps, region_ids)
    del region_ids
    return aupro_from_ranking(ranking, n_regions, fpr_limit, *cumulative_counts(ranking))


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
      region_ids: ``[N, H, W]`` region ids of :func:`label_regions` (0: normal pixel).
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
    maps = check_maps(masks, maps)
    region_ids, n_regions = label_regions(masks)
    n_normal = region_ids.size - int(np.count_nonzero(region_ids))
    if n_regions and n_normal and pro_curve_is_sampled(region_ids.size, max_pixels):
        region_ids, maps, n_regions = _sample_pixels(region_ids, maps, max_pixels, seed)
        if region_ids.size == 0:  # a budget so small that nothing was drawn: no curve
            return np.full(1, np.nan), np.full(1, np.nan)
    ranking = rank(maps, region_ids)
    del region_ids
    tp, fp = cumulative_counts(ranking)
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
