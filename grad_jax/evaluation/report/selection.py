"""The report's "Recipe selection" section: what a run that chose its recipe
(`grad_jax.selection`) records under "selection" in metrics.json, as HTML.

Text that comes from the record (candidate names, the validation's description, reasons) is
escaped.
"""

from __future__ import annotations

import html
import json
from typing import Any


def selection_section(record: dict[str, Any]) -> str:
    """The recipe selection of the run (its record as in metrics.json: candidates with their
    validation curve and s/epoch, the winner, whether its probe was continued, the skipped)."""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("candidate", "epoch", "image AUROC", "pixel AUROC", "AUPRO", "figure", "s/epoch")
    )
    rows = []
    for c in record["candidates"]:
        for point in c["curve"]:
            mark = " (winner)" if c["name"] == record["winner"] else ""
            rows.append(
                f"<tr><td>{html.escape(c['name'])}{mark}</td><td>{point['epoch']}</td>"
                + "".join(
                    f"<td>{point[k]:.4f}</td>"
                    for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")
                )
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
    return (
        '<section id="selection"><h2>Recipe selection (label-free)</h2>'
        f"<p>Ranked by the {html.escape(record['figure'])}; validation: "
        f"{html.escape(record['validation']['source'])} "
        f"({html.escape(json.dumps(record['validation']['images']))}). Winner: "
        f"<b>{html.escape(record['winner'])}</b>"
        f"{' (its probe state continued)' if record.get('reused_probe') else ''}.</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        + (f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else "")
        + (f"<p>Probes stopped early:</p><ul>{stopped}</ul>" if stopped else "")
        + "</section>"
    )
