"""Host-side (numpy) evaluation metrics for anomaly detection, by kind:

- `ranking`: the shared descending ranking (ties collapsed), AUROC, average precision, F1-max,
  the ROC curve, the false-alarm rate at a threshold;
- `regions`: the PRO curve, AUPRO, and the pixel sample of plotted PRO curves;
- `summary`: one category's metrics from one ranking (`evaluate_category`), every category with
  the mean row and notes (`summarise`), the metric table (`format_table`).

The public names are re-exported here: ``from grad_jax.evaluation import metrics;
metrics.auroc(labels, scores)``.
"""

from grad_jax.evaluation.metrics.ranking import (
    auroc,
    average_precision,
    f1_max,
    false_alarm_rate,
    miss_rate,
    roc_curve,
)
from grad_jax.evaluation.metrics.regions import aupro, pro_curve, pro_curve_is_sampled
from grad_jax.evaluation.metrics.summary import (
    KIND_COLUMNS,
    METRIC_KEYS,
    NOT_AVAILABLE,
    OPTIONAL_COLUMNS,
    TABLE_COLUMNS,
    CategoryResults,
    evaluate_category,
    format_table,
    summarise,
)

__all__ = [
    "KIND_COLUMNS",
    "METRIC_KEYS",
    "NOT_AVAILABLE",
    "OPTIONAL_COLUMNS",
    "TABLE_COLUMNS",
    "CategoryResults",
    "aupro",
    "auroc",
    "average_precision",
    "evaluate_category",
    "f1_max",
    "false_alarm_rate",
    "miss_rate",
    "format_table",
    "pro_curve",
    "pro_curve_is_sampled",
    "roc_curve",
    "summarise",
]
