"""grad_jax.inference.decisions: calibrated values, thresholds and their sources, class
recognition."""

import numpy as np
import pytest

from grad_jax.inference import decisions

NORMAL = {"a": [0.1, 0.2, 0.3, 0.4], "b": [1.0, 2.0]}


def _meta(with_centres=True, with_scores=True):
    meta = {
        "categories": ["a", "b"],
        "threshold": {
            "image_score": 1.5,
            "quantile": 0.99,
            "per_category": {"a": 0.39, "b": 1.99},
            "source": "held-out normal training images (never trained on)",
        },
    }
    if with_scores:
        meta["threshold"]["normal_scores"] = NORMAL
    if with_centres:
        meta["class_centres"] = {"names": ["a", "b"], "centres": [[0.0, 0.0], [10.0, 0.0]]}
    return meta


def test_calibrated_value_is_the_conformal_p_value_s_complement():
    normal = [0.1, 0.2, 0.2, 0.4]
    d = decisions.Decisions({"threshold": {"image_score": 0.4, "normal_scores": {"a": normal}}})
    for score, below in [(0.05, 0), (0.1, 0), (0.15, 1), (0.2, 1), (0.3, 3), (0.5, 4)]:
        assert d.calibrated_for(score, "a") == pytest.approx(below / 5)  # #{lower} / (n + 1)
    assert decisions.Decisions({}).calibrated_for(1.0, "a") is None


def test_nearest_centre_matches_brute_force():
    rng = np.random.default_rng(0)
    pooled, centres = rng.normal(size=(50, 7)), rng.normal(size=(5, 7))
    want = [int(np.argmin([np.linalg.norm(p - c) for c in centres])) for p in pooled]
    assert decisions.nearest_centre(pooled, centres).tolist() == want


def test_given_class_uses_its_threshold_and_normal_scores():
    d = decisions.Decisions(_meta())
    raw = np.zeros((3, 4, 4), np.float32)
    out = d.results(np.array([0.35, 0.39, 1.5]), raw, ["a", "a", "b"])
    assert [p.category for p in out] == ["a", "a", "b"]
    assert [p.category_source for p in out] == ["given"] * 3
    assert [p.threshold for p in out] == [0.39, 0.39, 1.99]
    assert [p.is_anomalous for p in out] == [False, True, False]
    # #{lower} / (n + 1): 3 of a's 4 normals, 1 of b's 2
    assert [p.calibrated for p in out] == pytest.approx([3 / 5, 3 / 5, 1 / 3])
    assert "class 'a'" in out[0].threshold_source and "4 held-out" in out[0].threshold_source


def test_unknown_class_is_recognised_from_pooled_features():
    d = decisions.Decisions(_meta())
    pooled = np.array([[9.0, 1.0], [0.5, -0.2]])
    out = d.results(np.array([1.0, 1.0]), np.zeros((2, 2, 2)), None, pooled)
    assert [p.category for p in out] == ["b", "a"]
    assert all(p.category_source == "recognised" for p in out)
    assert "recognised" in out[0].threshold_source
    mixed = d.results(np.array([1.0, 1.0]), np.zeros((2, 2, 2)), ["a", None], pooled)
    assert [p.category for p in mixed] == ["a", "a"]


def test_without_centres_recognition_is_said_to_be_unavailable():
    d = decisions.Decisions(_meta(with_centres=False))
    assert not d.can_recognise
    (p,) = d.results(np.array([1.6]), np.zeros((1, 2, 2)), None, np.zeros((1, 2)))
    assert p.category is None and p.threshold == 1.5 and p.is_anomalous is True
    assert "recognition is unavailable" in p.threshold_source
    assert p.calibrated == pytest.approx(5 / 7)  # against all 6 held-out scores: 5 lower


def test_old_runs_without_normal_scores_have_no_calibrated_value():
    d = decisions.Decisions(_meta(with_scores=False))
    (p,) = d.results(np.array([0.5]), np.zeros((1, 2, 2)), "a")
    assert p.calibrated is None and p.threshold == 0.39


def test_a_threshold_given_per_call_decides_every_class():
    d = decisions.Decisions(_meta())
    (p,) = d.results(np.array([0.25]), np.zeros((1, 2, 2)), "b", threshold=0.2)
    assert (p.threshold, p.is_anomalous, p.threshold_source) == (0.2, True, "given by the caller")
    (p,) = d.results(np.array([0.25]), np.zeros((1, 2, 2)), "b")  # the next call: stored again
    assert p.threshold == 1.99 and p.is_anomalous is False
    with pytest.raises(ValueError, match="finite"):
        d.results(np.array([0.25]), np.zeros((1, 2, 2)), "b", threshold=float("nan"))
    assert (
        decisions.Decisions({}).results(np.array([1.0]), np.zeros((1, 2, 2)))[0].threshold is None
    )


def test_bad_classes_are_refused():
    d = decisions.Decisions(_meta())
    with pytest.raises(ValueError, match="unknown class 'c'; this model knows: a, b"):
        d.results(np.array([1.0]), np.zeros((1, 2, 2)), "c")
    with pytest.raises(ValueError, match="2 categories given for 1 images"):
        d.results(np.array([1.0]), np.zeros((1, 2, 2)), ["a", "b"])


# --------------------------------------------------------------------------------------------
# Unknown kinds of part: a rejection radius per class (issue 18, item 4).
# --------------------------------------------------------------------------------------------


def _with_radii(radii):
    meta = _meta()
    meta["class_centres"]["radii"] = radii
    return meta


def test_an_image_far_from_every_class_is_an_unknown_class():
    d = decisions.Decisions(_with_radii([2.0, 3.0]))  # centres (0, 0) and (10, 0)
    pooled = np.array([[1.0, 0.0], [8.0, 0.0], [5.0, 5.0], [0.0, 2.0], [10.0, -3.0]])
    out = d.results(np.array([0.35, 1.5, 9.0, 0.1, 0.5]), np.zeros((5, 2, 2)), None, pooled)
    assert [p.category for p in out] == ["a", "b", None, "a", "b"]  # on the radius: known
    assert [p.category_source for p in out] == ["recognised"] * 2 + ["unknown class"] + [
        "recognised"
    ] * 2
    assert [p.threshold for p in out] == [0.39, 1.99, None, 0.39, 1.99]
    assert [p.is_anomalous for p in out] == [False, False, None, False, False]
    unknown = out[2]
    assert unknown.ok and unknown.calibrated is None and unknown.score == 9.0
    # nearest centre: 'a' at sqrt(50) = 7.071, beyond its radius 2
    assert "7.071" in unknown.threshold_source and "radius 2" in unknown.threshold_source
    assert "'a'" in unknown.threshold_source and unknown.threshold_source.startswith("none")


def test_the_radius_of_the_nearest_class_decides():
    """(6, 0) is 6 from 'a' (radius 7) and 4 from 'b' (radius 3): the nearest, 'b', rejects it."""
    d = decisions.Decisions(_with_radii([7.0, 3.0]))
    (p,) = d.results(np.array([1.0]), np.zeros((1, 2, 2)), None, np.array([[6.0, 0.0]]))
    assert p.category is None and p.category_source == "unknown class"
    assert "'b'" in p.threshold_source


def test_no_rejection_when_the_class_is_given_or_has_no_radius():
    d = decisions.Decisions(_with_radii([2.0, None]))
    far = np.array([[50.0, 50.0]])
    (p,) = d.results(np.array([1.0]), np.zeros((1, 2, 2)), "a", far)
    assert (p.category, p.category_source, p.threshold) == ("a", "given", 0.39)
    (p,) = d.results(np.array([1.0]), np.zeros((1, 2, 2)), None, np.array([[90.0, 0.0]]))
    assert (p.category, p.category_source) == ("b", "recognised")  # 'b' stores no radius


def test_an_unknown_class_is_not_decided_even_with_a_given_threshold():
    d = decisions.Decisions(_with_radii([2.0, 3.0]))
    (p,) = d.results(np.array([9.0]), np.zeros((1, 2, 2)), None, np.array([[5.0, 5.0]]), 1.0)
    assert p.category is None and p.is_anomalous is None and p.threshold is None


def test_radii_that_do_not_match_the_centres_are_refused():
    with pytest.raises(ValueError, match="1 radii for 2 class centres"):
        decisions.Decisions(_with_radii([2.0]))


# --------------------------------------------------------------------------------------------
# Non-finite outputs: an error for that image, never a decision (issue 18, item 2).
# --------------------------------------------------------------------------------------------


def test_non_finite_outputs_are_errors_not_decisions():
    d = decisions.Decisions(_meta())
    maps = np.zeros((4, 2, 2))
    maps[1, 0, 1] = np.inf
    pooled = np.array([[1.0, 0.0], [1.0, 0.0], [np.nan, 0.0], [9.0, 0.0]])
    out = d.results(np.array([np.nan, 0.5, 0.5, 0.5]), maps, None, pooled)
    assert [p.ok for p in out] == [False, False, False, True]
    assert "non-finite score" in out[0].error
    assert "non-finite anomaly map" in out[1].error
    assert "class cannot be recognised" in out[2].error
    for p in out[:3]:
        assert p.is_anomalous is None and p.threshold is None and p.calibrated is None
    assert out[3].category == "b" and out[3].is_anomalous is False
    (p,) = d.results(np.array([0.5]), maps[:1], "a", pooled[2:3])  # class given: not needed
    assert p.ok and p.is_anomalous is True


def test_conformal_thresholds_carry_their_guarantee_in_words_and_numbers():
    meta = _meta()
    meta["threshold"].update(
        rule="conformal",
        target_false_alarm=0.1,
        guarantee={
            "run": {"guarantee": 1 / 7, "text": "the 6th smallest of 6 held-out normal scores"},
            "per_category": {
                "a": {"guarantee": 0.2, "text": "the 4th smallest of 4 held-out normal scores"}
            },
        },
    )
    d = decisions.Decisions(meta)
    a, unknown = d.results(np.array([0.5, 0.5]), np.zeros((2, 2, 2)), ["a", None])
    assert a.false_alarm_bound == 0.2 and a.threshold == 0.39
    assert "conformal threshold for a 10% false-alarm target" in a.threshold_source
    assert "4th smallest of 4" in a.threshold_source
    # recognised as 'a' (pooled missing here: unknown class, the run's threshold and bound)
    assert unknown.threshold == 1.5 and unknown.false_alarm_bound == pytest.approx(1 / 7)
    (given,) = d.results(np.array([0.5]), np.zeros((1, 2, 2)), "a", threshold=0.45)
    assert given.false_alarm_bound is None  # the caller's threshold guarantees nothing known
    (b,) = d.results(np.array([0.5]), np.zeros((1, 2, 2)), "b")
    assert b.threshold == 1.99 and b.false_alarm_bound is None  # no stored guarantee for b
