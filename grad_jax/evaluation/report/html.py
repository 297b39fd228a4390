"""The report's page: self-contained HTML (inline CSS, relative links to the PNGs, no scripts).

Every function returns a piece of the page as a string; `page` puts them together. Text that
comes from the run (category and file names, the threshold's source) is escaped.
"""

from __future__ import annotations

import datetime
import html
import math
from typing import Any

import numpy as np

from grad_jax.evaluation import metrics
from grad_jax.evaluation.report.figures import (
    EXAMPLES_PER_GROUP,
    FPR_LIMIT,
    GROUP_TITLES,
    MAP_PERCENTILES,
    finite,
)
from grad_jax.evaluation.report.kinds import kinds_section
from grad_jax.evaluation.report.selection import selection_section

CSS = """
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

# (metric key, column title, description); metrics not listed here follow in dict order.
COLUMNS = metrics.TABLE_COLUMNS + metrics.OPTIONAL_COLUMNS
#: The section of a category without test images.
NO_TEST_IMAGES = "<p class='muted'>No test images: nothing to show.</p>"


def _fmt(value: Any, digits: int = 4) -> str:
    value = finite(value)
    return "n/a" if value is None else f"{value:.{digits}g}"


def _percent(value: Any) -> str:
    if value is None:
        return "–"
    value = finite(value)
    return "n/a" if value is None else f"{100.0 * value:.1f}"


# --------------------------------------------------------------------------------------------
# Metrics table and thresholds.
# --------------------------------------------------------------------------------------------


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
    known = [k for k, _, _ in COLUMNS]
    names = [k for k in known if k in names] + [k for k in names if k not in known]
    return categories, names


def _mean_row(categories: list[str], names: list[str], metrics: dict[str, float]) -> dict:
    row = {}
    for m in names:
        if f"mean/{m}" in metrics:
            row[m] = metrics[f"mean/{m}"]
            continue
        values = [finite(metrics.get(f"{c}/{m}")) for c in categories]
        values = [v for v in values if v is not None]
        row[m] = float(np.mean(values)) if values else math.nan
    return row


def metrics_table(results, metrics: dict[str, float]) -> str:
    """The per-category metrics table (in %), its mean row and a legend of the columns."""
    categories, names = _rows(results, metrics)
    if not categories:
        return "<p class='muted'>No metrics were given.</p>"
    titles = {k: (t, d) for k, t, d in COLUMNS}
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


def _decision_threshold(threshold: dict | None, metrics: dict[str, float]) -> str:
    """How images are decided: each class at its own threshold (with what it guarantees and
    what was measured on this test split), the run's threshold for an image of unknown class."""
    value = finite((threshold or {}).get("image_score"))
    if value is None:
        return (
            "<p>No decision threshold was recorded for this run (for instance no images were "
            "held out of training to set one), so images are not classified as good/defective "
            "here.</p>"
        )
    n = threshold.get("num_images")
    source = html.escape(str(threshold.get("source") or "unknown"))
    guarantees = threshold.get("guarantee") or {}
    if threshold.get("rule") == "conformal":
        target = finite(threshold.get("target_false_alarm"))
        run = guarantees.get("run") or {}
        how = (
            f"the conformal quantile of the held-out normal scores for a target false-alarm "
            f"rate of {_percent(target)}%: {html.escape(str(run.get('text', '')))}"
        )
    else:  # runs from before the conformal rule
        q = finite(threshold.get("quantile"))
        how = f"the {q:g} quantile of the held-out normal scores" if q is not None else "set"
    out = [
        "<p>Each class's images are decided at that class's own threshold (an image scoring at "
        "or above it is flagged as defective); an image whose class is not known is decided at "
        f"the run's threshold, <b>{value:.6g}</b>, {how} (all {n} held-out images: {source}).</p>"
    ]
    per = threshold.get("per_category") or {}
    if per:
        rows = []
        for c, v in per.items():
            g = (guarantees.get("per_category") or {}).get(c) or {}
            rows.append(
                f"<tr><td>{html.escape(str(c))}</td><td>{_fmt(v, 6)}</td>"
                f"<td>{g.get('n', '–')}</td><td>{_percent(g.get('guarantee'))}</td>"
                f"<td>{_percent(metrics.get(f'{c}/false_alarm_rate'))}</td>"
                f"<td>{_percent(metrics.get(f'{c}/miss_rate'))}</td></tr>"
            )
        out.append(
            "<table><thead><tr><th>category</th><th>threshold</th><th>held-out normal images"
            "</th><th>false alarms guaranteed (%)</th><th>false alarms measured on good test "
            "images (%)</th><th>defective test images missed (%)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            "<p class='sub'>Guaranteed: the bound the threshold's rule gives for normal parts "
            "like the held-out ones (split-conformal; with too few held-out images the largest "
            "score is used and the bound is 1/(n+1)). Measured: on this test split.</p>"
        )
    return "\n".join(out)


def threshold_section(results, metrics: dict[str, float], threshold: dict | None) -> str:
    """The decision threshold, then the test-set F1-optimal thresholds (reference only)."""
    out = [_decision_threshold(threshold, metrics)]
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


# --------------------------------------------------------------------------------------------
# Figures with their captions.
# --------------------------------------------------------------------------------------------


def figure_block(file: str, alt: str, caption: str) -> str:
    """A linked image with its caption (`caption` is HTML, `file` and `alt` plain text)."""
    return (
        f"<figure><a href='{html.escape(file)}'><img src='{html.escape(file)}' "
        f"alt='{html.escape(alt)}' loading='lazy'></a>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def roc_block(file: str, notes: list[str]) -> str:
    """The ROC figure; `notes` name the categories not drawn."""
    return figure_block(
        file,
        "Image-level ROC curves, one per category",
        "Image-level ROC: for every threshold on the image score, the fraction of "
        "defective test images flagged (true positive rate) against the fraction of "
        "good test images flagged (false positive rate); one line per category, AUROC "
        "in % in the legend; the dashed diagonal is chance. "
        + (f"Not drawn: {html.escape('; '.join(notes))}." if notes else ""),
    )


def pro_block(file: str, sampled: bool, max_pixels: int, notes: list[str]) -> str:
    """The PRO figure; `sampled`: some curve is drawn from a sample of `max_pixels`."""
    sample_note = (
        f" Categories marked * have more than {max_pixels:,} pixels: their curve is "
        "drawn from a seeded uniform subsample (all defect pixels kept up to half of that "
        "budget, normal pixels fill the rest) to keep the report fast; the AUPRO in the "
        "legend is always computed on all pixels."
        if sampled
        else " Every curve uses all pixels."
    )
    return figure_block(
        file,
        "Pixel-level PRO curves, one per category",
        "Pixel-level PRO (per-region overlap): for every threshold on the smoothed "
        "anomaly map, the mean over ground-truth defect regions of the fraction of each "
        "region above it, against the fraction of normal pixels above it (FPR), for FPR "
        f"up to {FPR_LIMIT:g}; AUPRO in % (area over that range, normalised) in the "
        "legend."
        + sample_note
        + (f" Not drawn: {html.escape('; '.join(notes))}." if notes else ""),
    )


def missing_classes(n_good: int, n_bad: int) -> list[str]:
    """Why a category's score histogram shows only one class (empty when it shows both)."""
    missing = []
    if not n_bad:
        missing.append("there are no defective test images, so only good scores are shown")
    if not n_good:
        missing.append("there are no good test images, so only defective scores are shown")
    return missing


def scores_block(
    name: str, file: str, n_good: int, n_bad: int, metrics: dict[str, float], threshold
) -> str:
    """The score histogram of category `name`, with a caption naming the lines drawn."""
    missing = missing_classes(n_good, n_bad)
    lines = []
    if finite((threshold or {}).get("image_score")) is not None:
        lines.append("the run's threshold, for images of unknown class (solid black)")
    if ((threshold or {}).get("per_category") or {}).get(name) is not None:
        lines.append(
            "this category's own threshold, the one its images are decided at (dashed grey)"
        )
    if finite(metrics.get(f"{name}/image_f1_threshold")) is not None:
        lines.append("the test-set F1-optimal threshold (dotted magenta, reference only)")
    return figure_block(
        file,
        f"Histogram of image scores for {name}",
        f"Image scores of the {n_good} good (blue) and {n_bad} defective (red) test "
        f"images of {html.escape(name)}"
        + (f", with {', '.join(lines)}" if lines else "")
        + ". Well separated colours mean a good image-level detector."
        + (f" Note: {'; '.join(missing)}." if missing else ""),
    )


def examples_block(
    name: str,
    file: str,
    shown: dict[str, list[dict]],
    n_bad: int,
    vrange: tuple[float, float],
    threshold_value: float | None,
) -> str:
    """The examples grid of category `name`; `shown`: group -> the images in its row (dicts
    with 'filename' and 'score'), listed under the caption."""
    listing = []
    for group, items in shown.items():
        title = GROUP_TITLES[group]
        if items:
            names = ", ".join(f"{html.escape(e['filename'])} ({e['score']:.4g})" for e in items)
            listing.append(f"<li>{title}: {names}</li>")
        else:
            why = "none left to show" if group == "missed" and n_bad else "no such images"
            listing.append(f"<li class='muted'>{title}: {why} (row omitted)</li>")
    alt_names = "; ".join(e["filename"] for items in shown.values() for e in items)
    return figure_block(
        file,
        f"Example test images of {name}: {alt_names}",
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


# --------------------------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------------------------


def category_heading(key: str, name: str) -> str:
    """The heading of a category's section, with the anchor `cat-<key>`."""
    return f"<h2 id='cat-{key}'>{html.escape(name)}</h2>"


def nav_link(key: str, name: str) -> str:
    """A link to the section of category `name` (see `category_heading`)."""
    return f"<a href='#cat-{key}'>{html.escape(name)}</a>"


def page(
    run_name: str,
    results,
    metrics: dict[str, float],
    threshold: dict | None,
    *,
    nav: list[str],
    overview: list[str],
    sections: list[str],
    notes: list[str],
    selection: dict[str, Any] | None = None,
    kinds: dict[str, dict[str, float]] | None = None,
    kind: str | None = None,
) -> str:
    """The whole of index.html: title, navigation, metrics table, the model kinds compared,
    thresholds, the curves
    (`overview`), one section per category, the notes and, when the run chose its recipe, the
    `selection` record's section."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>grad_jax report: {html.escape(run_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Anomaly detection report</h1>",
        f"<p class='sub'>Run folder <code>{html.escape(run_name)}</code> · {len(results)} "
        f"categories · written {stamp}</p>",
        f"<nav>{''.join(nav)}</nav>" if nav else "",
        "<h2>Metrics per category</h2>",
        metrics_table(results, metrics),
        kinds_section(kinds or {}, kind),
        "<h2>Thresholds</h2>",
        threshold_section(results, metrics, threshold),
        "<h2>Curves</h2>" if overview else "",
        *overview,
        *sections,
    ]
    if notes:
        body.append("<h2>Notes</h2><ul>")
        body += [f"<li>{html.escape(n)}</li>" for n in notes]
        body.append("</ul>")
    if selection:
        body.append(selection_section(selection))
    body.append("</body></html>")
    return "\n".join(x for x in body if x) + "\n"
