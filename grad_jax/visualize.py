"""Pictures: heat-map overlays, and the per-run visual report.

`write_report` turns the evaluation of a run (one `evaluate.CategoryEval` per category, the flat
metrics dict and the decision threshold) into `<workdir>/report/`:

- `index.html`: self-contained page (inline CSS, relative links to the PNGs, no scripts): the
  per-category metrics table, the decision threshold and where it came from, the test-set
  F1-optimal thresholds (for reference only), and every figure with a caption;
- `roc_image.png`: image-level ROC curves, one per category;
- `pro_pixel.png`: pixel PRO curves for FPR in [0, 0.3], one per category;
- `scores_<category>.png`: histograms of the image scores of good and defective test images;
- `examples_<category>.png`: the best detections, the misses and the false alarms, each as the
  image with its ground-truth outline next to the heat-map overlay;
- `report.json`: the files written, the examples shown and the plots skipped.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg, no pyplot state). Every file is
written to a temporary name and renamed, and `index.html` last, so an interrupted report leaves
the previous complete one in place.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import math
import os
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPORT_DIR = "report"
#: At most this many pixels per category go into the plotted PRO curve (not the AUPRO metric).
PLOT_PIXELS = 2_000_000
#: Images per row of an examples grid.
EXAMPLES_PER_GROUP = 4
DPI = 100
FPR_LIMIT = 0.3
#: Heat-map colour range of a category: these percentiles of all its smoothed map values.
MAP_PERCENTILES = (1.0, 99.9)

# (metric key, column title, description); metrics not listed here follow in dict order.
_COLUMNS = (
    ("image_auroc", "I-AUROC", "image-level area under the ROC curve"),
    ("pixel_auroc", "P-AUROC", "pixel-level area under the ROC curve"),
    ("pixel_aupro", "P-AUPRO", "pixel-level area under the PRO curve, FPR in [0, 0.3]"),
    ("image_ap", "I-AP", "image-level average precision"),
    ("pixel_ap", "P-AP", "pixel-level average precision"),
    ("image_f1_max", "I-F1max", "image-level best F1 over all thresholds"),
    ("pixel_f1_max", "P-F1max", "pixel-level best F1 over all thresholds"),
    (
        "false_alarm_rate",
        "FAR@thr",
        "share of good test images at or above the decision threshold (false alarms)",
    ),
)


def overlay(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an image.

    image: `[H, W, 3]` uint8; anomaly_map: `[H, W]` float at the same size; values are mapped
    linearly from [vmin, vmax] to the colour scale (blue = low, red = high) and clipped.
    Returns `[H, W, 3]` uint8.
    """
    from matplotlib import colormaps

    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"image {image.shape[:2]} and map {anomaly_map.shape} differ in size")
    span = max(float(vmax) - float(vmin), 1e-12)
    level = np.clip((anomaly_map.astype(np.float64) - vmin) / span, 0.0, 1.0)
    colours = colormaps["jet"](level)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------


def safe_name(name: str, taken: set[str] | None = None) -> str:
    """A file-name-safe version of `name` (letters, digits, '.', '_', '-'), unique in `taken`
    (compared case-insensitively, for case-insensitive file systems), which it is added to."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")[:80] or "category"
    candidate, k = base, 2
    while taken is not None and candidate.lower() in taken:
        candidate, k = f"{base}_{k}", k + 1
    if taken is not None:
        taken.add(candidate.lower())
    return candidate


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 4) -> str:
    value = _finite(value)
    return "n/a" if value is None else f"{value:.{digits}g}"


def _replace_atomically(path: str, write) -> None:
    """Calls `write(tmp_path)`, then renames the result onto `path`."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save(fig, path: str) -> None:
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _replace_atomically(path, write)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


# --------------------------------------------------------------------------------------------
# Curves.
# --------------------------------------------------------------------------------------------


def pro_curve_for_plot(
    maps: np.ndarray, masks: np.ndarray, max_pixels: int = PLOT_PIXELS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The PRO curve `(fpr, pro, sampled)` of a category, from at most ~`max_pixels` pixels.

    Same definitions as `metrics.pro_curve` (regions: 8-connected components of each image's
    mask; PRO: mean over regions of the covered fraction; FPR over the normal pixels; tied values
    move together), which it equals when the category has at most `max_pixels` pixels. Larger
    categories are subsampled for speed, uniformly within each class with a seeded generator:
    all anomalous pixels are kept if they fit in half the budget (else a uniform half-budget
    sample), and normal pixels fill the rest; region sizes and FPR are then sample fractions.
    Only for plots: AUPRO itself comes from the metrics. None when there is no region or no
    normal pixel.
    """
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within an image, never across images
    masks = np.asarray(masks) != 0
    if masks.ndim == 2:
        masks = masks[None]
    region_ids, n_regions = ndimage.label(masks, structure=structure)
    region_ids = region_ids.ravel()
    values = np.asarray(maps).ravel()
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)  # negating unsigned values below would wrap
    if values.size != region_ids.size:
        raise ValueError(f"maps {np.shape(maps)} and masks {masks.shape} differ in size")
    n_anomalous = int(np.count_nonzero(region_ids))
    n_normal = region_ids.size - n_anomalous
    if n_regions == 0 or n_normal == 0:
        return None
    sampled = region_ids.size > max_pixels
    if sampled:
        keep_anomalous = min(n_anomalous, max_pixels // 2)
        keep_normal = min(n_normal, max_pixels - keep_anomalous)
        draw = np.random.default_rng(seed).random(region_ids.size, dtype=np.float32)
        rate = np.where(region_ids != 0, keep_anomalous / n_anomalous, keep_normal / n_normal)
        keep = draw < rate
        values, region_ids = values[keep], region_ids[keep]
        del draw, rate, keep
    order = np.argsort(-values)  # tied values are grouped below, so their order is free
    values, region_ids = values[order], region_ids[order]
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]) + 1, values.size)
    normal = region_ids == 0
    present, sizes = np.unique(region_ids[~normal], return_counts=True)
    if present.size == 0 or normal.all():
        return None
    weight = np.zeros(int(region_ids.max()) + 1, dtype=np.float64)
    weight[present] = 1.0 / (present.size * sizes)
    fpr = np.zeros(ends.size + 1, dtype=np.float64)
    pro = np.zeros(ends.size + 1, dtype=np.float64)
    fpr[1:] = np.cumsum(normal, dtype=np.int64)[ends - 1] / np.count_nonzero(normal)
    pro[1:] = np.cumsum(weight[region_ids])[ends - 1]
    return fpr, pro, sampled


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


def _roc_figure(results, metrics: dict[str, float], path: str) -> tuple[list[str], list[str]]:
    """roc_image.png; returns (categories drawn, notes about those skipped)."""
    from grad_jax import metrics as metrics_lib

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
        if _finite(value) is None:
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


def _pro_figure(
    results, metrics: dict[str, float], path: str, max_pixels: int
) -> tuple[list[str], list[str], list[str]]:
    """pro_pixel.png; returns (categories drawn, subsampled ones, notes about skipped ones)."""
    fig = _figure(9.5, 6.0)
    ax = fig.add_subplot()
    drawn, sampled_names, notes = [], [], []
    styles = _category_styles(len(results))
    for k, r in enumerate(results):
        known = getattr(r, "has_mask", None)
        maps, masks = (r.maps, r.masks) if known is None else (r.maps[known], r.masks[known])
        curve = pro_curve_for_plot(maps, masks, max_pixels, seed=k) if len(maps) else None
        if curve is None:
            notes.append(f"{r.name}: no PRO curve (no defect region or no normal pixel)")
            continue
        fpr, pro, sampled = curve
        fpr, pro = _thin_curve(fpr, pro, FPR_LIMIT)
        value = _finite(metrics.get(f"{r.name}/pixel_aupro"))
        label = f"{r.name}  " + ("n/a" if value is None else f"{100 * value:.1f}")
        ax.plot(fpr, pro, lw=1.6, label=label + (" *" if sampled else ""), **styles[k])
        drawn.append(r.name)
        if sampled:
            sampled_names.append(r.name)
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


def _category_styles(n: int) -> list[dict]:
    """Line colour and style per category: the 10 tab10 colours, solid, then dashed, then
    dotted, so that up to 30 categories stay distinguishable."""
    from matplotlib import colormaps

    styles = ("-", "--", ":")
    return [
        dict(color=colormaps["tab10"](k % 10), ls=styles[(k // 10) % len(styles)]) for k in range(n)
    ]


# --------------------------------------------------------------------------------------------
# Per-category figures.
# --------------------------------------------------------------------------------------------


def _threshold_lines(name: str, metrics: dict[str, float], threshold: dict | None) -> list:
    """(value, label, style) of the vertical lines of a score histogram."""
    lines = []
    if threshold:
        value = _finite(threshold.get("image_score"))
        if value is not None:
            lines.append((value, f"decision threshold {value:.4g}", dict(color="k", ls="-")))
        q = threshold.get("quantile")
        own = _finite((threshold.get("per_category") or {}).get(name))
        if own is not None:
            what = f"{q:g} quantile" if _finite(q) is not None else "quantile"
            lines.append(
                (own, f"held-out {what}, this category only: {own:.4g}", dict(color="0.4", ls="--"))
            )
    f1 = _finite(metrics.get(f"{name}/image_f1_threshold"))
    if f1 is not None:
        lines.append(
            (f1, f"test-set F1-optimal {f1:.4g} (reference only)", dict(color="m", ls=":"))
        )
    return lines


def _scores_figure(r, metrics, threshold, path: str) -> None:
    from matplotlib.ticker import MaxNLocator

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


_GROUP_TITLES = {
    "detected": "Highest-scored defective images (best detections)",
    "missed": "Lowest-scored defective images (likeliest misses)",
    "false_alarms": "Highest-scored good images (likeliest false alarms)",
}


def _map_range(maps: np.ndarray) -> tuple[float, float]:
    finite = np.asarray(maps, dtype=np.float32).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, MAP_PERCENTILES))
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
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize(shape[::-1], Image.BILINEAR))
    return image


def _short_name(category: str, filename: str) -> str:
    prefix = f"{category}/"
    return filename[len(prefix) :] if filename.startswith(prefix) else filename


def _examples_figure(r, picks: dict[str, list[int]], vrange, threshold_value, path) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

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
    masks = np.asarray(r.masks)
    maps = np.asarray(r.maps)
    for g, (key, indices) in enumerate(groups):
        band, row = outer[1 + 2 * g], outer[2 + 2 * g]
        band.set_facecolor("0.9")
        band.text(0.005, 0.45, _GROUP_TITLES[key], fontsize=10, fontweight="bold", va="center")
        axes = np.atleast_1d(
            row.subplots(1, cols, gridspec_kw=dict(wspace=0.06, left=0.01, right=0.99))
        )
        row.subplots_adjust(top=0.8, bottom=0.02)
        for ax in axes:
            ax.set_axis_off()
        for ax, i in zip(axes, indices, strict=False):
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


# --------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1400px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
       margin-top: 1.8em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; border-bottom: 2px solid #999; }
tr.mean td { font-weight: bold; border-top: 2px solid #999; background: #fafafa; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.92em; max-width: 1100px; }
.warn { color: #8a4b00; } .muted { color: #777; } nav a { margin-right: 0.8em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _rows(results, metrics: dict[str, float]) -> tuple[list[str], list[str]]:
    """(category rows in order, percentage metric names in column order)."""
    categories, names = [], []
    for r in results:
        if r.name not in categories:
            categories.append(r.name)
    for key in metrics:
        category, _, metric = key.rpartition("/")
        if not category:
            continue
        if category != "mean" and category not in categories:
            categories.append(category)
        if not metric.endswith("_threshold") and metric not in names:
            names.append(metric)
    known = [k for k, _, _ in _COLUMNS]
    names = [k for k in known if k in names] + [k for k in names if k not in known]
    return categories, names


def _mean_row(categories: list[str], names: list[str], metrics: dict[str, float]) -> dict:
    row = {}
    for m in names:
        if f"mean/{m}" in metrics:
            row[m] = metrics[f"mean/{m}"]
            continue
        values = [_finite(metrics.get(f"{c}/{m}")) for c in categories]
        values = [v for v in values if v is not None]
        row[m] = float(np.mean(values)) if values else math.nan
    return row


def _percent(value: Any) -> str:
    if value is None:
        return "–"
    value = _finite(value)
    return "n/a" if value is None else f"{100.0 * value:.1f}"


def _metrics_html(results, metrics: dict[str, float]) -> str:
    categories, names = _rows(results, metrics)
    if not categories:
        return "<p class='muted'>No metrics were given.</p>"
    titles = {k: (t, d) for k, t, d in _COLUMNS}
    counts = {}
    for r in results:
        labels = np.asarray(r.labels) != 0
        counts[r.name] = (int((~labels).sum()), int(labels.sum()))
    head = "".join(
        f"<th title='{html.escape(titles.get(m, (m, m))[1])}'>"
        f"{html.escape(titles.get(m, (m, m))[0])}</th>"
        for m in names
    )
    out = [
        "<table class='metrics'><thead><tr><th>category</th>",
        head,
        "<th>good / defective test images</th></tr></thead><tbody>",
    ]
    for c in categories:
        cells = "".join(f"<td>{_percent(metrics.get(f'{c}/{m}'))}</td>" for m in names)
        n = counts.get(c)
        count = f"{n[0]} / {n[1]}" if n else "–"
        out.append(f"<tr><td>{html.escape(c)}</td>{cells}<td>{count}</td></tr>")
    mean = _mean_row(categories, names, metrics)
    cells = "".join(f"<td>{_percent(mean[m])}</td>" for m in names)
    total = [sum(n[j] for n in counts.values()) for j in (0, 1)]
    out.append(f"<tr class='mean'><td>mean</td>{cells}<td>{total[0]} / {total[1]}</td></tr>")
    out.append("</tbody></table>")
    legend = "; ".join(
        f"<b>{html.escape(titles[m][0])}</b>: {html.escape(titles[m][1])}"
        for m in names
        if m in titles
    )
    out.append(
        "<p class='sub'>All values in %, one decimal. The mean row is the unweighted mean over "
        "categories (each counts once), skipping undefined values. <i>n/a</i>: undefined (e.g. "
        "a category without defective test images, or pixel metrics where no defective test "
        "image has a mask: labels from folders only); –: not computed. "
        f"{legend}.</p>"
    )
    return "\n".join(out)


def _threshold_html(results, metrics: dict[str, float], threshold: dict | None) -> str:
    out = []
    value = _finite((threshold or {}).get("image_score"))
    if value is None:
        out.append(
            "<p>No decision threshold was recorded for this run (for instance no images were "
            "held out of training to set one), so images are not classified as good/defective "
            "here.</p>"
        )
    else:
        q = _finite(threshold.get("quantile"))
        n = threshold.get("num_images")
        source = threshold.get("source") or "unknown"
        what = f"the {q:g} quantile of the image scores" if q is not None else "set from scores"
        count = f" of {n} images" if n is not None else ""
        out.append(
            f"<p><b>Decision threshold (image score): {value:.6g}</b>, an image scoring at or "
            f"above it is flagged as defective. It is {what}{count}: "
            f"{html.escape(str(source))}.</p>"
        )
        per = threshold.get("per_category") or {}
        if per:
            rows = "".join(
                f"<tr><td>{html.escape(str(c))}</td><td>{_fmt(v, 6)}</td></tr>"
                for c, v in per.items()
            )
            out.append(
                "<p class='sub'>The same quantile over each category's held-out images alone "
                "(informative; the run-wide value above is the one applied):</p>"
                f"<table><thead><tr><th>category</th><th>quantile</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>"
            )
    categories, _ = _rows(results, metrics)
    rows = []
    for c in categories:
        image, pixel = (
            metrics.get(f"{c}/image_f1_threshold"),
            metrics.get(f"{c}/pixel_f1_threshold"),
        )
        if image is None and pixel is None:
            continue
        rows.append(
            f"<tr><td>{html.escape(c)}</td><td>{_fmt(image)}</td><td>{_fmt(pixel)}</td></tr>"
        )
    if rows:
        out.append(
            "<h3>F1-optimal thresholds — test-set optimal, for reference only</h3>"
            "<p class='warn'>These maximise F1 on the test labels themselves, so they are "
            "optimistic and must not be used as operating points.</p>"
            "<table><thead><tr><th>category</th><th>image score</th><th>pixel (map value)</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    return "\n".join(out)


def _figure_html(file: str, alt: str, caption: str) -> str:
    return (
        f"<figure><a href='{html.escape(file)}'><img src='{html.escape(file)}' "
        f"alt='{html.escape(alt)}' loading='lazy'></a>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def write_report(
    workdir: str,
    results: Sequence[Any],
    metrics: dict[str, float],
    threshold: dict | None,
    *,
    max_plot_pixels: int = PLOT_PIXELS,
) -> str:
    """Writes `<workdir>/report/` (see the module docstring); returns the path of index.html.

    `results`: one `evaluate.CategoryEval` per category (entry i of its arrays is `source[i]`);
    `metrics`: flat `"<category>/<metric>"` values as `metrics.evaluate` returns them (nan
    allowed); `threshold`: the run's decision threshold dict (`image_score`, `quantile`,
    `num_images`, `per_category`, `source`), or None when unknown.
    """
    metrics = dict(metrics or {})
    results = list(results)
    out_dir = os.path.join(workdir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    run_name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    threshold_value = _finite((threshold or {}).get("image_score"))
    files: list[str] = []
    notes: list[str] = []
    examples_json: dict[str, Any] = {}
    sections: list[str] = []

    overview = []
    if results:
        roc_drawn, roc_notes = _roc_figure(results, metrics, os.path.join(out_dir, "roc_image.png"))
        files.append("roc_image.png")
        notes += roc_notes
        overview.append(
            _figure_html(
                "roc_image.png",
                "Image-level ROC curves, one per category",
                "Image-level ROC: for every threshold on the image score, the fraction of "
                "defective test images flagged (true positive rate) against the fraction of "
                "good test images flagged (false positive rate); one line per category, AUROC "
                "in % in the legend; the dashed diagonal is chance. "
                + (f"Not drawn: {html.escape('; '.join(roc_notes))}." if roc_notes else ""),
            )
        )
        pro_drawn, sampled, pro_notes = _pro_figure(
            results, metrics, os.path.join(out_dir, "pro_pixel.png"), max_plot_pixels
        )
        files.append("pro_pixel.png")
        notes += pro_notes
        sample_note = (
            f" Categories marked * have more than {max_plot_pixels:,} pixels: their curve is "
            "drawn from a seeded uniform subsample (all defect pixels kept up to half of that "
            "budget, normal pixels fill the rest) to keep the report fast; the AUPRO in the "
            "legend is always computed on all pixels."
            if sampled
            else " Every curve uses all pixels."
        )
        overview.append(
            _figure_html(
                "pro_pixel.png",
                "Pixel-level PRO curves, one per category",
                "Pixel-level PRO (per-region overlap): for every threshold on the smoothed "
                "anomaly map, the mean over ground-truth defect regions of the fraction of each "
                "region above it, against the fraction of normal pixels above it (FPR), for FPR "
                f"up to {FPR_LIMIT:g}; AUPRO in % (area over that range, normalised) in the "
                "legend."
                + sample_note
                + (f" Not drawn: {html.escape('; '.join(pro_notes))}." if pro_notes else ""),
            )
        )
        del roc_drawn, pro_drawn

    taken: set[str] = set()
    nav = []
    for r in results:
        key = safe_name(r.name, taken)
        nav.append(f"<a href='#cat-{key}'>{html.escape(r.name)}</a>")
        part = [f"<h2 id='cat-{key}'>{html.escape(r.name)}</h2>"]
        labels = np.asarray(r.labels) != 0
        n_bad, n_good = int(labels.sum()), int((~labels).sum())
        if labels.size == 0:
            notes.append(f"{r.name}: no test images, no figures")
            part.append("<p class='muted'>No test images: nothing to show.</p>")
            sections.append("\n".join(part))
            continue
        scores_file = f"scores_{key}.png"
        _scores_figure(r, metrics, threshold, os.path.join(out_dir, scores_file))
        files.append(scores_file)
        missing = []
        if not n_bad:
            missing.append("there are no defective test images, so only good scores are shown")
        if not n_good:
            missing.append("there are no good test images, so only defective scores are shown")
        lines = ["the decision threshold (solid black)"] if threshold_value is not None else []
        if ((threshold or {}).get("per_category") or {}).get(r.name) is not None:
            lines.append("this category's own held-out quantile (dashed grey)")
        if _finite(metrics.get(f"{r.name}/image_f1_threshold")) is not None:
            lines.append("the test-set F1-optimal threshold (dotted magenta, reference only)")
        part.append(
            _figure_html(
                scores_file,
                f"Histogram of image scores for {r.name}",
                f"Image scores of the {n_good} good (blue) and {n_bad} defective (red) test "
                f"images of {html.escape(r.name)}"
                + (f", with {', '.join(lines)}" if lines else "")
                + ". Well separated colours mean a good image-level detector."
                + (f" Note: {'; '.join(missing)}." if missing else ""),
            )
        )
        if missing:
            notes.append(f"{r.name}: {'; '.join(missing)}")
        picks = pick_examples(r.scores, r.labels)
        vrange = _map_range(r.maps)
        examples_file = f"examples_{key}.png"
        _examples_figure(r, picks, vrange, threshold_value, os.path.join(out_dir, examples_file))
        files.append(examples_file)
        shown = {
            group: [
                {
                    "index": i,
                    "filename": str(r.filenames[i]),
                    "score": float(r.scores[i]),
                    "label": int(labels[i]),
                }
                for i in idx
            ]
            for group, idx in picks.items()
        }
        examples_json[r.name] = {"file": examples_file, "map_range": list(vrange), **shown}
        listing = []
        for group, items in shown.items():
            title = _GROUP_TITLES[group]
            if items:
                names = ", ".join(f"{html.escape(e['filename'])} ({e['score']:.4g})" for e in items)
                listing.append(f"<li>{title}: {names}</li>")
            else:
                why = "none left to show" if group == "missed" and n_bad else "no such images"
                listing.append(f"<li class='muted'>{title}: {why} (row omitted)</li>")
        alt_names = "; ".join(e["filename"] for items in shown.values() for e in items)
        part.append(
            _figure_html(
                examples_file,
                f"Example test images of {r.name}: {alt_names}",
                f"Up to {EXAMPLES_PER_GROUP} test images per row: the highest-scored defective "
                "images, the lowest-scored defective images (the likeliest misses) and the "
                "highest-scored good images (the likeliest false alarms). Each tile shows the "
                "image with its ground-truth defect outline (green) and the smoothed anomaly "
                "map blended over it (jet colours, blue = low, red = high; ground truth in "
                "white). The colour scale is the same for the whole category: "
                f"[{vrange[0]:.4g}, {vrange[1]:.4g}], percentiles {MAP_PERCENTILES[0]:g} and "
                f"{MAP_PERCENTILES[1]:g} of all of its map values, values outside "
                "clipped. Titles: file name, true label, image score"
                + (", and whether the decision threshold flags it" if threshold_value else "")
                + f".<ul>{''.join(listing)}</ul>",
            )
        )
        sections.append("\n".join(part))

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>grad_jax report: {html.escape(run_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Anomaly detection report</h1>",
        f"<p class='sub'>Run folder <code>{html.escape(run_name)}</code> · {len(results)} "
        f"categories · written {stamp}</p>",
        f"<nav>{''.join(nav)}</nav>" if nav else "",
        "<h2>Metrics per category</h2>",
        _metrics_html(results, metrics),
        "<h2>Thresholds</h2>",
        _threshold_html(results, metrics, threshold),
        "<h2>Curves</h2>" if overview else "",
        *overview,
        *sections,
    ]
    if notes:
        body.append("<h2>Notes</h2><ul>")
        body += [f"<li>{html.escape(n)}</li>" for n in notes]
        body.append("</ul>")
    body.append("</body></html>")

    manifest = {
        "run": run_name,
        "files": files + ["report.json", "index.html"],
        "figures": files,
        "examples": examples_json,
        "threshold": threshold_value,
        "notes": notes,
    }
    _write_text(os.path.join(out_dir, "report.json"), json.dumps(manifest, indent=1) + "\n")
    index = os.path.join(out_dir, "index.html")
    _write_text(index, "\n".join(x for x in body if x) + "\n")
    log.info("report written to %s", index)
    return index
