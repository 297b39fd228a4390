"""What a score means: the result type, calibrated values, thresholds and class recognition.

Shared by `grad_jax.inference.predictor.Predictor` and the exported model
(`grad_jax.inference.exported_model`), so it needs numpy only. Everything here reads the
model's meta (a JSON-able dict):

- `meta["threshold"]`: the run's decision threshold, set at training time from held-out normal
  images: `image_score` (all classes), `per_category` (class -> threshold), `quantile`,
  `normal_scores` (class -> the held-out normal images' scores behind them), `source`;
- `meta["class_centres"]`: `names` and `centres` (`[K, D]`), the mean pooled backbone feature of
  each class's training images, for recognising the class of an image, and `radii` (`[K]`,
  None for a class without one): how far from its centre an image may lie and still be that
  class (`grad_jax.training.calibration.class_centres`). A recognised image farther from its
  nearest centre than that class's radius is an unknown kind of part: no class, no threshold,
  no decision (`UNKNOWN_CLASS`);
- `meta["categories"]`: the class names, in training order.

Runs trained before these were stored lack `normal_scores` (no calibrated value),
`class_centres` (no recognition) or `radii` (every image is some class); the results then say
so in `threshold_source`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from grad_jax.inference import conformal

#: `Prediction.category_source` of an image that is none of the model's classes.
UNKNOWN_CLASS = "unknown class"

#: Why an unknown class cannot be recognised in a model without class centres.
NO_CENTRES = (
    "class recognition is unavailable: the model was trained before class centres were stored "
    "(retrain it, or pass the class explicitly)"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """The result for one image.

    score: the image anomaly score (higher = more anomalous).
    anomaly_map: `[H, W]` float32, the raw per-pixel anomaly map at the model input size
        (before the smoothing that the score is computed from).
    is_anomalous: `score >= threshold`, or None when no threshold is known.
    category: the class the decision was made for (given by the caller, or recognised), or
        None when unknown (`category_source` says whether it is an unknown kind of part).
    calibrated: the complement of the score's conformal p-value among that class's held-out
        normal scores, #{lower} / (n + 1) (0.99: fewer than 1% of normal parts would score as
        high), or None when the model has no such scores.
    threshold: the threshold the decision used, or None.
    false_alarm_bound: what that threshold guarantees: the probability that a normal part of
        the class is flagged is at most this (split-conformal, `inference.conformal`); None
        when unknown (a threshold given by the caller, or a model from before the rule).
    threshold_source: where the threshold (and the class) came from, in words.
    category_source: 'given', 'recognised', 'only class', 'unknown class' (farther from every
        class centre than that class's radius: not decided, `threshold_source` says how far),
        or '' (no class could be found).
    error: why the image has no result (the model gave a non-finite score, map or feature),
        or None. An
        image with an error has no decision and no calibrated value; every consumer (predict,
        the service, the page) reports it as a failure naming the image, never as a decision.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomalous: bool | None
    category: str | None = None
    calibrated: float | None = None
    threshold: float | None = None
    threshold_source: str = ""
    category_source: str = ""
    error: str | None = None
    false_alarm_bound: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unknown_class(self) -> bool:
        """True for an image recognised as none of the model's classes (no decision)."""
        return self.category_source == UNKNOWN_CLASS


def centre_distances(pooled: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row to each centre: `[N, D]`, `[K, D]` -> `[N, K]` float64."""
    pooled = np.asarray(pooled, np.float64)
    centres = np.asarray(centres, np.float64)
    if pooled.ndim != 2 or centres.ndim != 2 or pooled.shape[1] != centres.shape[1]:
        raise ValueError(f"pooled {pooled.shape} and centres {centres.shape} do not match")
    d2 = (pooled**2).sum(1)[:, None] - 2.0 * pooled @ centres.T + (centres**2).sum(1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0))


def nearest_centre(pooled: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (Euclidean) for each row: `[N, D]`, `[K, D]` -> `[N]` int."""
    return np.argmin(centre_distances(pooled, centres), axis=1)


class ClassFound(NamedTuple):
    """The class of one image and how it was found (`Decisions.categories_for`).

    category: the class, or None; how: 'given', 'only class', 'recognised', 'unknown class'
    or '' (none could be found); note: for an unknown class, how far the image lies and the
    radius it exceeds; error: why the class cannot be recognised (non-finite features), or None.
    """

    category: str | None
    how: str
    note: str = ""
    error: str | None = None


class Decisions:
    """Thresholds, calibrated values and class recognition from a model's meta dict."""

    def __init__(self, meta: dict[str, Any] | None):
        meta = dict(meta or {})
        self.meta = meta
        th = meta.get("threshold") or {}
        self.run_threshold: float | None = _float_or_none(th.get("image_score"))
        self.per_category = {
            str(k): float(v) for k, v in (th.get("per_category") or {}).items() if v is not None
        }
        self.normal_scores = {
            str(k): np.asarray(v, np.float64) for k, v in (th.get("normal_scores") or {}).items()
        }
        self.conformal = th.get("rule") == "conformal"
        self.target = _float_or_none(th.get("target_false_alarm"))
        guarantees = th.get("guarantee") or {}
        self.run_guarantee = guarantees.get("run") or {}
        self.class_guarantees = guarantees.get("per_category") or {}
        self.quantile = th.get("quantile")
        centres = meta.get("class_centres") or {}
        self.centre_names = [str(n) for n in centres.get("names") or []]
        self.centres = (
            np.asarray(centres["centres"], np.float32) if self.centre_names else np.zeros((0, 0))
        )
        radii = centres.get("radii") if self.centre_names else None
        if radii is not None and len(radii) != len(self.centre_names):
            raise ValueError(
                f"the model's class_centres hold {len(radii)} radii for "
                f"{len(self.centre_names)} class centres: export or retrain the model"
            )
        #: Per class, the farthest an image may lie from its centre (None: no limit).
        self.radii: list[float | None] = [
            None if r is None else float(r) for r in (radii or [None] * len(self.centre_names))
        ]
        self.margin = centres.get("margin")
        names = meta.get("categories") or self.centre_names or sorted(self.per_category)
        self.categories: list[str] = [str(n) for n in names]

    @property
    def can_recognise(self) -> bool:
        return len(self.centre_names) > 0

    def categories_for(
        self, n: int, categories: Sequence[str | None] | str | None, pooled: np.ndarray | None
    ) -> list[ClassFound]:
        """The class of each of `n` images: from the caller, the only class, recognised from
        `pooled` (`[n, D]`), an unknown class (its nearest centre farther than that class's
        radius), or none when none of these is possible (see `ClassFound`)."""
        if categories is None or isinstance(categories, str):
            wanted: list[str | None] = [categories] * n
        else:
            wanted = list(categories)
            if len(wanted) != n:
                raise ValueError(f"{len(wanted)} categories given for {n} images")
        for c in wanted:
            if c is not None and self.categories and c not in self.categories:
                raise ValueError(
                    f"unknown class {c!r}; this model knows: {', '.join(self.categories)}"
                )
        out: list[ClassFound] = []
        distances: np.ndarray | None = None
        pooled = None if pooled is None else np.asarray(pooled, np.float64)
        for i, c in enumerate(wanted):
            if c is not None:
                out.append(ClassFound(c, "given"))
            elif len(self.categories) == 1:
                out.append(ClassFound(self.categories[0], "only class"))
            elif self.can_recognise and pooled is not None:
                if distances is None:
                    finite = np.where(np.isfinite(pooled), pooled, 0.0)
                    distances = centre_distances(finite, self.centres)
                if not np.isfinite(pooled[i]).all():
                    why = "the model gave non-finite pooled features; the class cannot be "
                    out.append(ClassFound(None, "", error=why + "recognised (pass it explicitly)"))
                    continue
                k = int(np.argmin(distances[i]))
                out.append(self._recognised(k, float(distances[i, k])))
            else:
                out.append(ClassFound(None, ""))
        return out

    def _recognised(self, k: int, distance: float) -> ClassFound:
        """The class of an image whose nearest centre is `k`, at `distance`."""
        name, radius = self.centre_names[k], self.radii[k]
        if radius is None or distance <= radius:
            return ClassFound(name, "recognised")
        margin = f"{self.margin:g} x " if isinstance(self.margin, int | float) else ""
        return ClassFound(
            None,
            UNKNOWN_CLASS,
            f"none: unknown class: the image's backbone features are {distance:.4g} from the "
            f"nearest class centre ('{name}'), beyond that class's radius {radius:.4g} ({margin}"
            "the farthest of its training images); not decided (pass the class to decide it)",
        )

    def threshold_for(
        self, category: str | None, given: float | None = None
    ) -> tuple[float | None, str]:
        """(threshold, where it came from) for an image of `category` (None: unknown): `given`
        by the caller when it is not None, else the class's stored one, else the run's."""
        if given is not None:
            given = float(given)
            if not math.isfinite(given):
                raise ValueError(f"the threshold must be a finite number, got {given}")
            return given, "given by the caller"
        if category is not None and category in self.per_category:
            return self.per_category[category], f"class '{category}': " + self._rule(
                self.class_guarantees.get(category), len(self.normal_scores.get(category, ()))
            )
        if self.run_threshold is None:
            return None, "none: the model stores no decision threshold (no held-out images)"
        why = "the run's threshold over all classes: " + self._rule(self.run_guarantee, None)
        if category is None and len(self.categories) > 1:
            why += " (class unknown"
            why += ")" if self.can_recognise else "; " + NO_CENTRES + ")"
        return self.run_threshold, why

    def _rule(self, guarantee: dict | None, n: int | None) -> str:
        """How a stored threshold was set, in words (with its guarantee when it has one)."""
        if self.conformal and guarantee:
            return (
                f"conformal threshold for a {100 * (self.target or 0):.3g}% false-alarm target, "
                + str(guarantee.get("text", ""))
            )
        q = f"{self.quantile:.4g} quantile" if self.quantile is not None else "quantile"
        count = f" of {n}" if n else " of the"
        return f"{q}{count} held-out normal images' scores"

    def bound_for(self, category: str | None, given: float | None = None) -> float | None:
        """The false-alarm bound of the threshold an image of `category` is decided with."""
        if given is not None or not self.conformal:
            return None
        if category is not None and category in self.per_category:
            return _float_or_none((self.class_guarantees.get(category) or {}).get("guarantee"))
        if self.run_threshold is None:
            return None
        return _float_or_none(self.run_guarantee.get("guarantee"))

    def calibrated_for(self, score: float, category: str | None) -> float | None:
        if category is not None and category in self.normal_scores:
            return conformal.calibrated_value(score, self.normal_scores[category])
        if category is None and self.normal_scores:
            everything = np.concatenate(list(self.normal_scores.values()))
            return conformal.calibrated_value(score, everything)
        return None

    def results(
        self,
        scores: np.ndarray,
        raw_maps: Sequence[np.ndarray],
        categories: Sequence[str | None] | str | None = None,
        pooled: np.ndarray | None = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """Predictions for `scores` `[n]`, `raw_maps` (n maps) and `pooled` `[n, D]`, decided
        with `threshold` when it is given, else each image's class's stored threshold. An image
        recognised as an unknown class is not decided (not even with `threshold`); an image with
        a non-finite score or map (or pooled features, where its class must be recognised) is a
        `Prediction` with an `error`."""
        n = len(scores)
        out = []
        for i, (category, how, note, why) in enumerate(self.categories_for(n, categories, pooled)):
            score = float(scores[i])
            raw = np.asarray(raw_maps[i], np.float32)
            if not math.isfinite(score):
                error = f"the model gave a non-finite score ({score}); the image was not decided"
                out.append(_failed(score, raw, category, how, error))
                continue
            if not np.isfinite(raw).all():
                error = "the model gave a non-finite anomaly map; the image was not decided"
                out.append(_failed(score, raw, category, how, error))
                continue
            if why is not None:
                out.append(_failed(score, raw, category, how, why))
                continue
            if how == UNKNOWN_CLASS:
                out.append(Prediction(score, raw, None, None, None, None, note, how))
                continue
            used, source = self.threshold_for(category, threshold)
            decision = None if used is None else bool(score >= used)
            if how == "recognised":
                source += "; class recognised from the image's backbone features"
            calibrated = self.calibrated_for(score, category)
            bound = self.bound_for(category, threshold) if used is not None else None
            out.append(
                Prediction(
                    score, raw, decision, category, calibrated, used, source, how, None, bound
                )
            )
        return out


def _failed(
    score: float, raw_map: np.ndarray, category: str | None, how: str, error: str
) -> Prediction:
    """The result of an image the model could not score: no decision, an error saying why."""
    return Prediction(
        score,
        raw_map,
        None,
        category,
        category_source=how,
        threshold_source="none: no decision",
        error=error,
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
