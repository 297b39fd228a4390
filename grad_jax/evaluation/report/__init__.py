"""The per-run visual report.

`write_report` turns the evaluation of a run (one `evaluate.CategoryEval` per category, the flat
metrics dict, the decision threshold and, when the run chose its recipe, the selection record of
metrics.json) into `<workdir>/report/`:

- `index.html`: self-contained page (inline CSS, relative links to the PNGs, no scripts): the
  per-category metrics table, the decision threshold and where it came from, the test-set
  F1-optimal thresholds (for reference only), and every figure with a caption;
- `roc_image.png`: image-level ROC curves, one per category;
- `pro_pixel.png`: pixel PRO curves for FPR in [0, 0.3], one per category;
- `scores_<category>.png`: histograms of the image scores of good and defective test images;
- `examples_<category>.png`: the best detections, the misses and the false alarms, each as the
  image with its ground-truth outline next to the heat-map overlay;
- `report.json`: the files written, the examples shown, the plots skipped and, when the run
  chose its recipe, the selection record that the page's "Recipe selection" section shows.

The figures are drawn by `report.figures`, the page written by `report.html` (its recipe
selection section by `report.selection`). Every file is written to a temporary name and
renamed, and `index.html` last, so an interrupted report leaves the previous complete one in
place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from grad_jax.evaluation.report import figures, html
from grad_jax.files import atomic_write_text, unique_name

__all__ = ["PLOT_PIXELS", "REPORT_DIR", "safe_name", "write_report"]

log = logging.getLogger(__name__)

REPORT_DIR = "report"
#: At most this many pixels per category go into the plotted PRO curve (not the AUPRO metric).
PLOT_PIXELS = 2_000_000


def safe_name(name: str, taken: set[str] | None = None) -> str:
    """A file-name-safe version of `name` (letters, digits, '.', '_', '-'), unique in `taken`
    (compared case-insensitively, for case-insensitive file systems), which it is added to."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")[:80] or "category"
    return base if taken is None else unique_name(base, taken)


@dataclasses.dataclass
class _Contents:
    """What the report has gathered so far, section by section, in page order."""

    figures: list[str] = dataclasses.field(default_factory=list)  # PNG file names
    notes: list[str] = dataclasses.field(default_factory=list)
    examples: dict[str, Any] = dataclasses.field(default_factory=dict)  # report.json entry
    overview: list[str] = dataclasses.field(default_factory=list)  # HTML of the curves
    nav: list[str] = dataclasses.field(default_factory=list)  # HTML links to the categories
    sections: list[str] = dataclasses.field(default_factory=list)  # HTML, one per category


def _overview_curves(
    out: _Contents, out_dir: str, results: list, metrics: dict[str, float], max_pixels: int
) -> None:
    """roc_image.png and pro_pixel.png, with their captions."""
    _, notes = figures.roc_figure(results, metrics, os.path.join(out_dir, "roc_image.png"))
    out.figures.append("roc_image.png")
    out.notes += notes
    out.overview.append(html.roc_block("roc_image.png", notes))
    drawn, sampled, notes = figures.pro_figure(
        results, metrics, os.path.join(out_dir, "pro_pixel.png"), max_pixels
    )
    out.notes += notes
    if drawn:  # a PRO plot without any masked defect would show nothing
        out.figures.append("pro_pixel.png")
        out.overview.append(html.pro_block("pro_pixel.png", bool(sampled), max_pixels, notes))


def _shown_examples(r, picks: dict[str, list[int]]) -> dict[str, list[dict]]:
    """group -> the report.json entries of the images shown in its row."""
    labels = np.asarray(r.labels) != 0
    return {
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


def _category_section(
    out: _Contents,
    out_dir: str,
    r,
    key: str,
    metrics: dict[str, float],
    threshold: dict | None,
) -> None:
    """The section of category `r` (files named with `key`): score histogram and examples."""
    out.nav.append(html.nav_link(key, r.name))
    part = [html.category_heading(key, r.name)]
    labels = np.asarray(r.labels) != 0
    n_bad, n_good = int(labels.sum()), int((~labels).sum())
    if labels.size == 0:
        out.notes.append(f"{r.name}: no test images, no figures")
        out.sections.append("\n".join([*part, html.NO_TEST_IMAGES]))
        return
    scores_file = f"scores_{key}.png"
    figures.scores_figure(r, metrics, threshold, os.path.join(out_dir, scores_file))
    out.figures.append(scores_file)
    part.append(html.scores_block(r.name, scores_file, n_good, n_bad, metrics, threshold))
    missing = html.missing_classes(n_good, n_bad)
    if missing:
        out.notes.append(f"{r.name}: {'; '.join(missing)}")
    threshold_value = figures.finite((threshold or {}).get("image_score"))
    picks = figures.pick_examples(r.scores, r.labels)
    vrange = figures.map_range(r.maps)
    examples_file = f"examples_{key}.png"
    figures.examples_figure(r, picks, vrange, threshold_value, os.path.join(out_dir, examples_file))
    out.figures.append(examples_file)
    shown = _shown_examples(r, picks)
    out.examples[r.name] = {"file": examples_file, "map_range": list(vrange), **shown}
    part.append(html.examples_block(r.name, examples_file, shown, n_bad, vrange, threshold_value))
    out.sections.append("\n".join(part))


def _write_manifest(
    out_dir: str, run_name: str, out: _Contents, threshold_value, selection: dict | None
) -> None:
    """report.json: the files written, the figures, the examples shown, the notes and the
    recipe selection (when there was one)."""
    manifest = {
        "run": run_name,
        "files": out.figures + ["report.json", "index.html"],
        "figures": out.figures,
        "examples": out.examples,
        "threshold": threshold_value,
        "notes": out.notes,
    }
    if selection:
        manifest["selection"] = selection
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(manifest, indent=1) + "\n")


def write_report(
    workdir: str,
    results: Sequence[Any],
    metrics: dict[str, float],
    threshold: dict | None,
    *,
    selection: dict[str, Any] | None = None,
    kinds: dict[str, dict[str, float]] | None = None,
    kind: str | None = None,
    max_plot_pixels: int = PLOT_PIXELS,
) -> str:
    """Writes `<workdir>/report/` (see the module docstring); returns the path of index.html.

    `results`: one `evaluate.CategoryEval` per category (entry i of its arrays is `source[i]`);
    `metrics`: flat `"<category>/<metric>"` values as `metrics.summarise` returns them (nan
    allowed); `threshold`: the run's decision threshold dict (`image_score`, `quantile`,
    `num_images`, `per_category`, `source`), or None when unknown; `selection`: the recipe
    selection's record as in metrics.json (`candidates`, `winner`, `skipped`, `validation`,
    `figure`, `reused_probe`), or None when the run did not choose its recipe;
    `kinds`: every model kind's flat metric values (`evaluate.kind_metrics`) and `kind` the
    run's own, for the comparison table; `max_plot_pixels`: pixels per category above which its
    plotted PRO curve is drawn from a sample.
    """
    metrics = dict(metrics or {})
    results = list(results)
    out_dir = os.path.join(workdir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    run_name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    out = _Contents()
    if results:
        _overview_curves(out, out_dir, results, metrics, max_plot_pixels)
    taken: set[str] = set()
    for r in results:
        _category_section(out, out_dir, r, safe_name(r.name, taken), metrics, threshold)
    threshold_value = figures.finite((threshold or {}).get("image_score"))
    _write_manifest(out_dir, run_name, out, threshold_value, selection)
    index = os.path.join(out_dir, "index.html")
    contents = dict(
        nav=out.nav, overview=out.overview, sections=out.sections, notes=out.notes,
        selection=selection, kinds=kinds, kind=kind,
    )  # fmt: skip
    atomic_write_text(index, html.page(run_name, results, metrics, threshold, **contents))
    log.info("report written to %s", index)
    return index
