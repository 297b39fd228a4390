"""The report's figures, drawn on `matplotlib.figure.Figure` objects (Agg, no pyplot state).

Each `*_figure` function writes one PNG atomically (`files.atomic_write`) and returns what the
page needs to say about it. `results` are `evaluate.CategoryEval`s (`name`, `filenames`,
`labels [N]`, `scores [N]`, `maps [N, H, W]`, `masks [N, H, W]`, `source`, `has_mask`).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from grad_jax.evaluation import metrics as metrics_lib
from grad_jax.files import atomic_write
from grad_jax.inference.heatmap import overlay

#: Images per row of an examples grid.
EXAMPLES_PER_GROUP = 4
DPI = 100
#: The PRO plot shows FPR in [0, FPR_LIMIT] (the AUPRO range).
FPR_LIMIT = 0.3
#: Heat-map colour range of a category: these percentiles of all its smoothed map values.
MAP_PERCENTILES = (1.0, 99.9)
#: Title of each row of an examples grid, in display order.
GROUP_TITLES = {
    "detected": "Highest-scored defective images (best detections)",
    "missed": "Lowest-scored defective images (likeliest misses)",
    "false_alarms": "Highest-scored good images (likeliest false alarms)",
}


def finite(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, not a number, nan or infinite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _save(fig: Figure, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI)


# --------------------------------------------------------------------------------------------
# Curves of all categories.
# --------------------------------------------------------------------------------------------


def _thin_curve(
    x: np.ndarray, y: np.ndarray, x_max: float, points: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """The part of a non-decreasing-x curve up to just past `x_max`, with at most ~4 `points`
    vertices (the first and last vertex of each of `points` equal x-steps are kept)."""
    cut = min(int(np.searchsorted(x, x_max, side="right")) + 1, x.size)
    x, y = x[:cut], y[:cut]
    if x.size <= 4 * points:
        return x, y
    grid = np.linspace(x[0], x[-1], points)
    keep = np.concatenate(
        [[0, x.size - 1], np.searchsorted(x, grid, "left"), np.searchsorted(x, grid, "right") - 1]
    )
    keep = np.unique(np.clip(keep, 0, x.size - 1))
    return x[keep], y[keep]


def _legend_outside(ax, n: int) -> None:
    if n == 0:  # nothing drawn (e.g. no category has masks): no empty legend
        return
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8 if n <= 20 else 6,
        ncol=1 if n <= 20 else 2,
        frameon=False,
    )


def _category_styles(n: int) -> list[dict]:
    """Line colour and style per category: the 10 tab10 colours, solid, then dashed, then
    dotted, so that up to 30 categories stay distinguishable."""
    styles = ("-", "--", ":")
    return [
        dict(color=colormaps["tab10"](k % 10), ls=styles[(k // 10) % len(styles)]) for k in range(n)
    ]


def roc_figure(results, metrics: dict[str, float], path: str) -> tuple[list[str], list[str]]:
    """Image-level ROC curves, one per category, to `path` (roc_image.png).

    Returns (categories drawn, notes about those skipped)."""
    fig = _figure(8.0, 5.6)
    ax = fig.add_subplot()
    drawn, notes = [], []
    styles = _category_styles(len(results))
    for k, r in enumerate(results):
        labels = np.asarray(r.labels) != 0
        if labels.size == 0 or labels.all() or not labels.any():
            kind = "defective" if not labels.any() else "good"
            notes.append(f"{r.name}: no ROC curve (no {kind} test images)")
            continue
        fpr, tpr = metrics_lib.roc_curve(labels, np.asarray(r.scores))
        value = metrics.get(f"{r.name}/image_auroc")
        if finite(value) is None:
            value = metrics_lib.auroc(labels, np.asarray(r.scores))
        ax.plot(fpr, tpr, lw=1.6, label=f"{r.name}  {100 * value:.1f}", **styles[k])
        drawn.append(r.name)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="chance  50.0")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.set_xlabel("false positive rate (good images flagged)")
    ax.set_ylabel("true positive rate (defective images flagged)")
    ax.set_title("Image-level ROC per category (legend: AUROC %)")
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(drawn) + 1)
    fig.tight_layout()
    _save(fig, path)
    return drawn, notes


def pro_figure(
    results, metrics: dict[str, float], path: str, max_pixels: int
) -> tuple[list[str], list[str], list[str]]:
    """Pixel-level PRO curves for FPR in [0, FPR_LIMIT], one per category, to `path`
    (pro_pixel.png); a category of more than `max_pixels` pixels (images with a known mask) is
    drawn from a sample (`metrics.pro_curve`), seeded with its index.

    Returns (categories drawn, subsampled ones, notes about skipped ones); nothing is written
    when no category can be drawn."""
    fig = _figure(9.5, 6.0)
    ax = fig.add_subplot()
    drawn, sampled_names, notes = [], [], []
    styles = _category_styles(len(results))
    for k, r in enumerate(results):
        known = getattr(r, "has_mask", None)
        maps, masks = (r.maps, r.masks) if known is None else (r.maps[known], r.masks[known])
        fpr = pro = None
        if len(maps):
            fpr, pro = metrics_lib.pro_curve(masks, maps, max_pixels, seed=k)
        if fpr is None or np.isnan(fpr).all():
            notes.append(f"{r.name}: no PRO curve (no defect region or no normal pixel)")
            continue
        sampled = metrics_lib.pro_curve_is_sampled(np.size(masks), max_pixels)
        fpr, pro = _thin_curve(fpr, pro, FPR_LIMIT)
        value = finite(metrics.get(f"{r.name}/pixel_aupro"))
        label = f"{r.name}  " + ("n/a" if value is None else f"{100 * value:.1f}")
        ax.plot(fpr, pro, lw=1.6, label=label + (" *" if sampled else ""), **styles[k])
        drawn.append(r.name)
        if sampled:
            sampled_names.append(r.name)
    if not drawn:  # nothing to show (no category has a masked defect): no figure at all
        return drawn, sampled_names, notes
    ax.set(xlim=(0, FPR_LIMIT), ylim=(0, 1.01))
    ax.set_xlabel("false positive rate (normal pixels above the threshold)")
    ax.set_ylabel("per-region overlap (mean covered fraction of each defect)")
    title = "Pixel-level PRO per category (legend: AUPRO % over FPR 0-0.3)"
    if sampled_names:
        title += "\n* curve drawn from a pixel subsample; AUPRO from all pixels"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(drawn))
    fig.tight_layout()
    _save(fig, path)
    return drawn, sampled_names, notes


# --------------------------------------------------------------------------------------------
# Score histogram of one category.
# --------------------------------------------------------------------------------------------


def _threshold_lines(name: str, metrics: dict[str, float], threshold: dict | None) -> list:
    """(value, label, style) of the vertical lines of a score histogram."""
    lines = []
    if threshold:
        value = finite(threshold.get("image_score"))
        if value is not None:
            lines.append((value, f"run threshold {value:.4g}", dict(color="k", ls="-")))
        own = finite((threshold.get("per_category") or {}).get(name))
        if own is not None:
            lines.append((own, f"this category's threshold {own:.4g}", dict(color="0.4", ls="--")))
    f1 = finite(metrics.get(f"{name}/image_f1_threshold"))
    if f1 is not None:
        lines.append(
            (f1, f"test-set F1-optimal {f1:.4g} (reference only)", dict(color="m", ls=":"))
        )
    return lines


def scores_figure(r, metrics: dict[str, float], threshold: dict | None, path: str) -> None:
    """Histograms of the image scores of the good and defective test images of category `r`,
    with the threshold lines, to `path`."""
    scores = np.asarray(r.scores, dtype=np.float64)
    labels = np.asarray(r.labels) != 0
    good, bad = scores[~labels], scores[labels]
    fig = _figure(9.0, 3.8)
    ax = fig.add_subplot()
    lines = _threshold_lines(r.name, metrics, threshold)
    span = np.concatenate([scores, [v for v, _, _ in lines]])
    lo, hi = float(span.min()), float(span.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, int(np.clip(np.sqrt(scores.size) * 2, 10, 40)) + 1)
    for values, colour, what in ((good, "tab:blue", "good"), (bad, "tab:red", "defective")):
        if values.size:
            ax.hist(values, bins, color=colour, alpha=0.45, label=f"{what} (n={values.size})")
            ax.hist(values, bins, color=colour, histtype="step", lw=1.4)
    for value, label, style in lines:
        ax.axvline(value, lw=1.6, label=label, **style)
    ax.set_xlabel("image score")
    ax.set_ylabel("test images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.02)
    note = ""
    if not bad.size:
        note = " (no defective test images)"
    elif not good.size:
        note = " (no good test images)"
    ax.set_title(f"{r.name}: image scores{note}")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Examples grid of one category.
# --------------------------------------------------------------------------------------------


def pick_examples(
    scores: np.ndarray, labels: np.ndarray, k: int = EXAMPLES_PER_GROUP
) -> dict[str, list[int]]:
    """Indices of the examples to show, each list in display order.

    'detected': the k highest-scored defective images; 'missed': the k lowest-scored defective
    images not already shown (lowest first); 'false_alarms': the k highest-scored good images.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) != 0
    order = np.argsort(-scores, kind="stable")
    defective = [int(i) for i in order if labels[i]]
    good = [int(i) for i in order if not labels[i]]
    detected = defective[:k]
    missed = [i for i in reversed(defective) if i not in detected][:k]
    return {"detected": detected, "missed": missed, "false_alarms": good[:k]}


def map_range(maps: np.ndarray) -> tuple[float, float]:
    """The heat-map colour range of a category: MAP_PERCENTILES of its finite map values."""
    values = np.asarray(maps, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, MAP_PERCENTILES))
    return lo, hi


def _load_image(r, i: int, shape: tuple[int, int]) -> np.ndarray:
    """The i-th test image as `[H, W, 3]` uint8 at the map size (grey if it cannot be read)."""
    if r.source is None:
        return np.full(shape + (3,), 128, np.uint8)
    image = np.asarray(r.source[i]["image"])
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3].astype(np.uint8)
    if image.shape[:2] != shape:
        image = np.asarray(Image.fromarray(image).resize(shape[::-1], Image.BILINEAR))
    return image


def _short_name(category: str, filename: str) -> str:
    prefix = f"{category}/"
    return filename[len(prefix) :] if filename.startswith(prefix) else filename


def _example_tile(ax, r, i: int, vrange: tuple[float, float], threshold_value) -> None:
    """Test image i of category `r` with its mask outline, next to its heat-map overlay."""
    masks, maps = np.asarray(r.masks), np.asarray(r.maps)
    h, w = maps[i].shape
    image = _load_image(r, i, (h, w))
    gap = max(1, w // 20)
    tile = np.full((h, 2 * w + gap, 3), 255, np.uint8)
    tile[:, :w] = image
    tile[:, w + gap :] = overlay(image, maps[i], *vrange)
    ax.imshow(tile, interpolation="nearest")
    mask = (masks[i] != 0).astype(np.float32)
    if mask.any():
        ys, xs = np.arange(h), np.arange(w)
        for offset, edge in ((0, "lime"), (w + gap, "white")):
            ax.contour(xs + offset, ys, mask, levels=[0.5], colors=edge, linewidths=1)
    score = float(r.scores[i])
    defective = bool(np.asarray(r.labels)[i])
    known = getattr(r, "has_mask", None)
    unmasked = known is not None and not bool(known[i])
    verdict = " (no mask)" if unmasked else ""
    if threshold_value is not None:
        verdict += "  flagged" if score >= threshold_value else "  passed"
    name = textwrap.shorten(_short_name(r.name, str(r.filenames[i])), 44, placeholder="…")
    ax.set_title(
        f"{name}\n{'defective' if defective else 'good'}  score {score:.4g}{verdict}",
        fontsize=8,
        color="tab:red" if defective else "tab:blue",
    )


def examples_figure(
    r,
    picks: dict[str, list[int]],
    vrange: tuple[float, float],
    threshold_value: float | None,
    path: str,
) -> None:
    """One row of tiles per non-empty group of `picks` (see `pick_examples`), the heat maps
    coloured over `vrange`, and a colour bar, to `path`."""
    groups = [(key, idx) for key, idx in picks.items() if idx]
    cols = max(len(idx) for _, idx in groups)
    head_h, band_h, row_h, bar_h, tile_w = 0.5, 0.32, 2.45, 0.85, 3.9
    heights = [head_h] + [band_h, row_h] * len(groups) + [bar_h]
    fig = _figure(cols * tile_w, sum(heights))
    outer = fig.subfigures(len(heights), 1, height_ratios=heights)
    outer[0].text(
        0.5,
        0.45,
        f"{r.name}: left = image with ground-truth outline, right = anomaly map overlay",
        fontsize=11,
        ha="center",
        va="center",
    )
    for g, (key, indices) in enumerate(groups):
        band, row = outer[1 + 2 * g], outer[2 + 2 * g]
        band.set_facecolor("0.9")
        band.text(0.005, 0.45, GROUP_TITLES[key], fontsize=10, fontweight="bold", va="center")
        axes = np.atleast_1d(
            row.subplots(1, cols, gridspec_kw=dict(wspace=0.06, left=0.01, right=0.99))
        )
        row.subplots_adjust(top=0.8, bottom=0.02)
        for ax in axes:
            ax.set_axis_off()
        for ax, i in zip(axes, indices, strict=False):
            _example_tile(ax, r, i, vrange, threshold_value)
    bar = outer[-1].add_axes((0.25, 0.62, 0.5, 0.14))
    mappable = ScalarMappable(norm=Normalize(*vrange), cmap=colormaps["jet"])
    cb = outer[-1].colorbar(mappable, cax=bar, orientation="horizontal")
    cb.ax.tick_params(labelsize=7)
    cb.set_label(
        f"anomaly map value; colours clipped to [{vrange[0]:.4g}, {vrange[1]:.4g}] "
        f"(percentiles {MAP_PERCENTILES[0]:g} and {MAP_PERCENTILES[1]:g} of all {r.name} maps)",
        fontsize=8,
    )
    _save(fig, path)
