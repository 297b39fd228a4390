"""grad_jax.inference.conformal: exact order statistics, the small-n rule, and the guarantee
itself checked by simulation on exchangeable normal scores."""

import math

import numpy as np
import pytest

from grad_jax.inference import conformal


@pytest.mark.parametrize(
    "n, alpha, k",
    [
        (99, 0.01, 99),  # ceil(100 * 0.99) = 99: the largest of 99
        (199, 0.01, 198),  # ceil(200 * 0.99) = 198
        (9, 0.1, 9),  # ceil(10 * 0.9) = 9
        (19, 0.1, 18),  # ceil(20 * 0.9) = 18
        (100, 0.05, 96),  # ceil(101 * 0.95) = ceil(95.95) = 96
        (40, 0.25, 31),  # ceil(41 * 0.75) = ceil(30.75) = 31
    ],
)
def test_the_threshold_is_the_kth_smallest_score(n, alpha, k):
    scores = np.random.default_rng(n).permutation(np.arange(n, dtype=np.float64) * 0.5 + 3.0)
    t = conformal.conformal_threshold(scores, alpha)
    assert (t.k, t.n, t.reached) == (k, n, True)
    assert t.value == 3.0 + 0.5 * (k - 1)  # the k-th smallest of 3.0, 3.5, 4.0, ...
    assert t.guarantee == pytest.approx((n + 1 - k) / (n + 1))
    assert t.guarantee <= alpha + 1e-12


def test_too_few_images_use_the_largest_score_and_say_what_they_guarantee():
    scores = [0.3, 0.1, 0.5, 0.2, 0.4]
    t = conformal.conformal_threshold(scores, 0.01)
    assert (t.value, t.k, t.reached) == (0.5, 5, False)
    assert t.guarantee == pytest.approx(1 / 6)
    assert t.needed == 99  # n >= 1/0.01 - 1
    assert "needs at least 99 held-out normal images; only 5" in t.describe()
    assert conformal.needed_images(0.1) == 9 and conformal.needed_images(0.05) == 19
    # the boundary: 98 images cannot reach 1%, 99 can
    assert not conformal.conformal_threshold(np.arange(98.0), 0.01).reached
    assert conformal.conformal_threshold(np.arange(99.0), 0.01).reached


def test_refusals():
    with pytest.raises(ValueError, match="no held-out"):
        conformal.conformal_threshold([], 0.01)
    with pytest.raises(ValueError, match="NaN"):
        conformal.conformal_threshold([0.1, math.nan], 0.01)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            conformal.conformal_threshold([0.1], bad)


def test_p_value_and_calibrated_value_against_brute_force():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=37).round(2)  # ties on purpose
    for score in [*normal[:5], -9.0, 9.0, float(np.median(normal))]:
        above = sum(1 for s in normal if s >= score)
        below = sum(1 for s in normal if s < score)
        assert conformal.p_value(score, normal) == pytest.approx((1 + above) / 38)
        assert conformal.calibrated_value(score, normal) == pytest.approx(below / 38)
    assert conformal.p_value(0.1, []) is None
    assert conformal.calibrated_value(math.nan, normal) is None


@pytest.mark.parametrize("n, alpha", [(19, 0.1), (9, 0.2), (5, 0.01)])
def test_the_false_alarm_rate_is_what_is_guaranteed(n, alpha):
    """Many draws of n held-out and one new normal score from one distribution: the share of
    new scores at or above the threshold is the guarantee (n + 1 - k) / (n + 1), within
    sampling error; with too few images, 1 / (n + 1)."""
    rng = np.random.default_rng(n)
    trials = 20000
    draws = rng.gamma(2.0, size=(trials, n + 1))
    flagged = 0
    for row in draws:
        t = conformal.conformal_threshold(row[:n], alpha)
        flagged += row[n] >= t.value
    rate = flagged / trials
    guarantee = conformal.conformal_threshold(draws[0, :n], alpha).guarantee
    assert abs(rate - guarantee) < 4 * math.sqrt(guarantee * (1 - guarantee) / trials)
