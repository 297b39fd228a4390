"""The report's model-kinds section: GRAD, the nearest-neighbour baseline and their combination
on the same test split, so a user sees on their own data which one to deploy."""

from __future__ import annotations

import html
import math

from grad_jax.evaluation.metrics import KIND_COLUMNS as COLUMNS

KIND_NAMES = {
    "grad": "GRAD (the method)",
    "knn": "kNN baseline (nearest neighbour, same features)",
    "grad+knn": "GRAD + kNN (standardised maps, averaged)",
}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td>n/a</td>"
    return f"<td>{100.0 * float(value):.1f}</td>"


def kinds_section(kinds: dict[str, dict[str, float]], deployed: str | None) -> str:
    """A table of every kind's mean figures (in %), the run's own kind marked; '' for one kind."""
    if len(kinds) < 2:
        return ""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in COLUMNS)
    rows = []
    for kind, values in kinds.items():
        name = html.escape(KIND_NAMES.get(kind, kind))
        if kind == deployed:
            name = f"<b>{name}</b> (this run's kind)"
        cells = "".join(_cell(values.get(f"mean/{key}")) for key, _ in COLUMNS)
        rows.append(f"<tr><td>{name}</td>{cells}</tr>")
    return (
        "<h2>Model kinds</h2><p class='sub'>The same test split scored by every model kind "
        "(means over classes, %); each decided at its own thresholds from the held-out normal "
        "images. <code>model.kind</code> chooses the one a deployed model uses.</p>"
        f"<table><thead><tr><th>kind</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
