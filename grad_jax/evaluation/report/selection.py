"""The report's "Recipe selection" section: what a run that chose its recipe and model kind
(`grad_jax.selection`) records under "selection" in metrics.json, as HTML.

Text that comes from the record (candidate names, the validation's description, reasons) is
escaped. A record from before model kinds competed (its figures at the top level of each
candidate and curve point, no "winner_kind") is shown as GRAD's.
"""

from __future__ import annotations

import html
import json
from typing import Any

_FIGURES = ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")


def _by_kind(entry: dict[str, Any], order: list[str]) -> dict[str, dict[str, float]]:
    """kind -> figures of a candidate or curve point, kinds in `order` (metrics.json sorts
    keys); an old record's figures are GRAD's, at the top level."""
    if "kinds" not in entry:
        return {"grad": entry}
    return {k: entry["kinds"][k] for k in order if k in entry["kinds"]}


def selection_section(record: dict[str, Any]) -> str:
    """The recipe selection of the run (its record as in metrics.json: candidates with their
    validation curve per model kind and s/epoch, the winning recipe and kind, whether its probe
    was continued, the skipped)."""
    with_kinds = "kinds" in record  # older records: one (GRAD) figure per recipe, no column
    titles = ["candidate", "kind", "epoch", "image AUROC", "pixel AUROC", "AUPRO", "figure"]
    head = "".join(f"<th>{h}</th>" for h in [*titles[: 1 + with_kinds], *titles[2:], "s/epoch"])
    winner_kind = record.get("winner_kind")
    order = list(record.get("kinds") or [])
    rows = []
    for c in record["candidates"]:
        for kind in _by_kind(c, order):
            won = c["name"] == record["winner"] and winner_kind in (None, kind)
            first = f"<td>{html.escape(c['name'])}{' (winner)' if won else ''}</td>"
            if with_kinds:
                first += f"<td>{html.escape(kind)}</td>"
            for point in c["curve"]:
                figures = _by_kind(point, order).get(kind)
                if figures is None:
                    continue
                rows.append(
                    f"<tr>{first}<td>{point['epoch']}</td>"
                    + "".join(f"<td>{figures[k]:.4f}</td>" for k in _FIGURES)
                    + f"<td>{c['seconds_per_epoch']:.1f}</td></tr>"
                )
    skipped = "".join(
        f"<li>{html.escape(s['name'])}: {html.escape(s['reason'])}</li>"
        for s in record.get("skipped", [])
    )
    stopped = "".join(
        f"<li>{html.escape(c['name'])}: {html.escape(c['stopped_early'])}</li>"
        for c in record["candidates"]
        if c.get("stopped_early")
    )
    competing = (
        " Candidates are (recipe, model kind) pairs, kinds "
        f"{html.escape(', '.join(record['kinds']))}; ties go to the earlier recipe, then to the "
        "earlier kind."
        if with_kinds
        else ""
    )
    winner = html.escape(record["winner"]) + (
        f", model kind {html.escape(winner_kind)}" if winner_kind else ""
    )
    return (
        '<section id="selection"><h2>Recipe selection (label-free)</h2>'
        f"<p>Ranked by the {html.escape(record['figure'])}; validation: "
        f"{html.escape(record['validation']['source'])} "
        f"({html.escape(json.dumps(record['validation']['images']))}).{competing} Winner: "
        f"<b>{winner}</b>"
        f"{' (its probe state continued)' if record.get('reused_probe') else ''}.</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        + (f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else "")
        + (f"<p>Probes stopped early:</p><ul>{stopped}</ul>" if stopped else "")
        + "</section>"
    )
