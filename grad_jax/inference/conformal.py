"""Decision thresholds with a stated false-alarm guarantee (split-conformal), numpy only.

With n held-out normal images of a class (never trained on) whose scores are s_1..s_n, and a new
normal image whose score S is exchangeable with them (same kind of part, same process), the rank
of S among the n + 1 scores is uniform. So the threshold t = s_(k), the k-th smallest held-out
score with

    k = ceil((n + 1) * (1 - a)),

flags a normal image (S >= t) with probability at most (n + 1 - k) / (n + 1) <= a: the target
false-alarm rate `a` is guaranteed, on average over the draw of the held-out images. When n is too
small for the target (k > n, i.e. n < 1/a - 1), the largest score is used (k = n) and the
guarantee is 1 / (n + 1); `needed_images(a)` says how many normal images the target needs.

The calibrated value of a score is the complement of its conformal p-value,
p = (1 + #{s_i >= score}) / (n + 1): calibrated = #{s_i < score} / (n + 1), so a decision at
target a flags exactly the scores whose p-value is at most about a.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np


def _fraction(alpha: float) -> Fraction:
    """`alpha` as an exact fraction of its decimal text (0.01 is 1/100, not a binary float)."""
    value = Fraction(str(alpha))
    if not 0 < value < 1:
        raise ValueError(f"the target false-alarm rate must lie in (0, 1), got {alpha}")
    return value


def needed_images(alpha: float) -> int:
    """The fewest held-out normal images for which the target `alpha` is reachable:
    the smallest n with ceil((n + 1)(1 - alpha)) <= n, i.e. n >= 1/alpha - 1."""
    a = _fraction(alpha)
    return max(1, math.ceil(1 / a - 1))


@dataclasses.dataclass(frozen=True)
class ConformalThreshold:
    """A threshold from n held-out normal scores.

    value: the k-th smallest score (decide `score >= value`); k, n: its rank and the sample size;
    target: the false-alarm rate asked for; guarantee: the bound that holds, (n + 1 - k) / (n + 1)
    (at most `target` when `reached`); needed: the held-out images the target needs.
    """

    value: float
    k: int
    n: int
    target: float
    guarantee: float
    reached: bool
    needed: int

    def describe(self) -> str:
        """The guarantee in words."""
        bound = f"{100 * self.guarantee:.3g}%"
        text = (
            f"the {_ordinal(self.k)} smallest of {self.n} held-out normal scores: a normal part is "
            f"flagged with probability at most {bound}"
        )
        if not self.reached:
            text += (
                f" (the target {100 * self.target:.3g}% needs at least {self.needed} held-out "
                f"normal images; only {self.n} were available, so the largest score is used)"
            )
        return text

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "text": self.describe()}


def _ordinal(k: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st, ..."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def conformal_threshold(scores: Sequence[float] | np.ndarray, alpha: float) -> ConformalThreshold:
    """The conformal threshold of held-out normal `scores` for the target false-alarm rate
    `alpha` (see the module docstring). Raises ValueError without scores or with a non-finite
    one."""
    values = np.sort(np.asarray(scores, np.float64).ravel())
    n = int(values.size)
    if n == 0:
        raise ValueError("no held-out normal scores to set a threshold from")
    if not np.isfinite(values).all():
        raise ValueError("the held-out normal scores hold NaN or infinite values")
    a = _fraction(alpha)
    k = math.ceil((n + 1) * (1 - a))
    reached = k <= n
    k = min(max(k, 1), n)
    guarantee = (n + 1 - k) / (n + 1)
    return ConformalThreshold(
        float(values[k - 1]), k, n, float(alpha), guarantee, reached, needed_images(alpha)
    )


def p_value(score: float, normal_scores: Sequence[float] | np.ndarray) -> float | None:
    """The conformal p-value of `score`: (1 + #{s_i >= score}) / (n + 1); None without scores
    or for a non-finite score."""
    normal = np.asarray(normal_scores, np.float64).ravel()
    if normal.size == 0 or not math.isfinite(score):
        return None
    return float((1 + np.count_nonzero(normal >= score)) / (normal.size + 1))


def calibrated_value(score: float, normal_scores: Sequence[float] | np.ndarray) -> float | None:
    """1 - p_value: #{s_i < score} / (n + 1), in [0, n / (n + 1)]; None as `p_value`."""
    p = p_value(score, normal_scores)
    return None if p is None else 1.0 - p
