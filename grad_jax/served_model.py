"""The model behind the inspection service: what it must offer, and how to load one.

`ServedModel` is the interface shared by `grad_jax.predict.Predictor` and the exported model
(`grad_jax.deploy.load_model`): `predict(images, categories=None) -> list[Prediction]`,
`image_size`, `categories`, `meta`, `batch_size`. `PredictorModel` adapts a Predictor that
predates per-class decisions (no `categories` argument): it fills the class, the threshold and
where it came from from the run's stored thresholds. `load_model` opens either kind of folder.
"""

import dataclasses
import inspect
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class ServedModel(Protocol):
    """What the service needs of a model (Predictor and the exported model both offer it)."""

    image_size: tuple[int, int]
    categories: Sequence[str]
    meta: dict[str, Any]
    batch_size: int

    def predict(
        self, images: Sequence[Any], categories: Sequence[str | None] | None = None
    ) -> list[Any]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class Decided:
    """A prediction with every field the service reports (see `grad_jax.predict.Prediction`).

    anomaly_map: `[H, W]` float32 at the model input size. calibrated: the fraction of the
    class's held-out normal images that scored lower, or None when the model does not store them.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomalous: bool | None
    category: str | None = None
    calibrated: float | None = None
    threshold: float | None = None
    threshold_source: str = "none"


class PredictorModel:
    """A `Predictor` behind the served-model interface.

    When the Predictor's `predict` takes `categories` it is passed through untouched; otherwise
    the fields it lacks are filled here from the run's stored thresholds: the class's threshold
    when the class is known (given, or the run's only class), else the run's threshold;
    `calibrated` stays None (the run stores no held-out scores).
    """

    def __init__(self, predictor: Any):
        self.predictor = predictor
        self.image_size = tuple(int(x) for x in predictor.image_size)
        self.batch_size = int(predictor.batch_size)
        self._native = "categories" in inspect.signature(predictor.predict).parameters
        stored = getattr(predictor, "categories", None)
        if stored is None:
            per_class = (predictor.meta.get("threshold") or {}).get("per_category") or {}
            stored = list(per_class)
        self.categories = [str(c) for c in stored]

    @property
    def meta(self) -> dict[str, Any]:
        p = self.predictor
        meta = dict(p.meta)
        meta.update(
            source="run folder",
            run=os.path.basename(os.path.normpath(p.workdir)) if p.workdir else None,
            step=p.step,
            image_size=list(self.image_size),
            categories=list(self.categories),
        )
        return meta

    def predict(
        self, images: Sequence[Any], categories: Sequence[str | None] | None = None
    ) -> list[Any]:
        if self._native:
            return self.predictor.predict(images, categories=categories)
        predictions = self.predictor.predict(images)
        wanted = list(categories) if categories is not None else [None] * len(predictions)
        return [self._fill(p, c) for p, c in zip(predictions, wanted, strict=True)]

    def _fill(self, p: Any, category: str | None) -> Decided:
        threshold_info = self.predictor.meta.get("threshold") or {}
        per_class = self.predictor.category_thresholds
        if category is None and len(self.categories) == 1:
            category = self.categories[0]
        if category is not None and category in per_class:
            threshold = per_class[category]
            source = f"held-out normal images of class '{category}'"
        elif self.predictor.threshold is not None:
            threshold = float(self.predictor.threshold)
            source = "held-out normal images of all classes"
        else:
            threshold, source = None, "none: the run stored no threshold"
        if threshold is not None and threshold_info.get("quantile") is not None:
            source = f"{float(threshold_info['quantile']):.3g} quantile of the {source}"
        return Decided(
            score=float(p.score),
            anomaly_map=p.anomaly_map,
            is_anomalous=None if threshold is None else bool(p.score >= threshold),
            category=category,
            calibrated=getattr(p, "calibrated", None),
            threshold=threshold,
            threshold_source=source,
        )


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded as asked; the message says what to do instead."""


def load_model(
    model_dir: str | None = None,
    workdir: str | None = None,
    batch_size: int = 8,
    step: int | None = None,
) -> ServedModel:
    """An exported model folder (`grad_jax.deploy.load_model`) or a run folder (Predictor)."""
    if (model_dir is None) == (workdir is None):
        raise ModelUnavailable("give exactly one of --model=MODEL_DIR and --workdir=RUN_DIR")
    if model_dir is not None:
        try:
            from grad_jax import deploy  # noqa: PLC0415 - optional until the export lands
        except ImportError as err:
            raise ModelUnavailable(
                f"--model needs grad_jax.deploy (the exported-model loader), which this "
                f"installation lacks ({err}); serve a run folder with --workdir=DIR instead"
            ) from None
        sig = inspect.signature(deploy.load_model).parameters
        kwargs = {"batch_size": batch_size} if "batch_size" in sig else {}
        return deploy.load_model(model_dir, **kwargs)
    from grad_jax.predict import Predictor

    return PredictorModel(Predictor.from_workdir(workdir, step=step, batch_size=batch_size))
