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


def test_calibrated_value_is_the_fraction_strictly_below():
    normal = [0.5, 0.1, 0.3, 0.3]
    for score in (0.0, 0.1, 0.2, 0.3, 0.31, 0.5, 9.0):
        want = sum(x < score for x in normal) / len(normal)  # brute force
        assert decisions.calibrated_value(score, normal) == want
    assert decisions.calibrated_value(1.0, []) is None


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
    assert [p.calibrated for p in out] == [0.75, 0.75, 0.5]
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
    assert p.calibrated == 5 / 6  # against every class's held-out scores


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
