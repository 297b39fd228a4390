"""Per-image classes: the class recognition accuracy that evaluation reports (nearest class centre,
Euclidean) against a numpy reference, per class and as the unweighted mean, with several classes
of different sizes; and the class centres of a tiled training source (every tile counts for its
image's class)."""

import json

import numpy as np
import pytest
from grad_jax.configs import tiny

from grad_jax.data import input_pipeline
from grad_jax.evaluation import evaluate
from grad_jax.training import calibration


def _result(name, pooled, seed=0):
    n = 2 if pooled is None else len(pooled)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    masks = np.zeros((n, 8, 8), np.uint8)
    masks[labels == 1, 2:5, 2:5] = 1
    return evaluate.CategoryEval(
        rng.random(n),
        labels.astype(np.int32),
        rng.random((n, 8, 8)).astype(np.float32),
        masks,
        np.ones(n, bool),
        name=name,
        filenames=[f"{name}/{i}.png" for i in range(n)],
        folder_labels=labels.astype(np.int32),
        pooled=None if pooled is None else np.asarray(pooled, np.float32),
    )


#: Centres in an order other than the results', with a class ('d') that has no test images, of
#: different norms along one direction: the nearest (Euclidean) is not the largest dot product,
#: and the cosine cannot tell 'a' from 'b'.
CENTRES = {
    "names": ["c", "a", "d", "b"],
    "centres": [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 0.0]],
}


def _nearest_reference(pooled, centres):
    d = ((np.asarray(pooled)[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1)
    return d.argmin(axis=1)


def _three_classes():
    a = [[1.1, 0, 0], [1.9, 0, 0], [2.1, 0.1, 0], [0.9, 0.2, 0.1]]  # 2.1 is nearer 'b'
    b = [[2.6, 0, 0], [1.4, 0, 0]]  # 1.4 is nearer 'a' (its dot product is larger with 'b')
    c = [[0, 1.8, 0], [0.1, 2.2, 0.0], [0, 0.9, 1.5], [1.2, 1.0, 0], [0, 1.5, 0.4]]
    return [_result("a", a, 1), _result("b", b, 2), _result("c", c, 3)]


def test_recognition_accuracy_per_class_and_unweighted_mean():
    results = _three_classes()
    names = CENTRES["names"]
    want = {}
    for r in results:
        guess = _nearest_reference(r.pooled, CENTRES["centres"])
        want[f"{r.name}/recognition_accuracy"] = np.mean([names[g] == r.name for g in guess])
    # by hand: a 3/4 (2.1 -> b); b 1/2 (1.4 -> a); c 3/5 (0, 0.9, 1.5 -> d; 1.2, 1.0 -> a)
    assert want == {
        "a/recognition_accuracy": 0.75,
        "b/recognition_accuracy": 0.5,
        "c/recognition_accuracy": 0.6,
    }
    want["mean/recognition_accuracy"] = (0.75 + 0.5 + 0.6) / 3  # not 7 / 11 (image-weighted)
    got = evaluate.recognition_accuracy(results, CENTRES)
    assert got == pytest.approx(want, abs=1e-12) and set(got) == set(want)


def test_classes_without_pooled_features_are_left_out():
    results = _three_classes()
    results[1] = _result("b", None)
    got = evaluate.recognition_accuracy(results, CENTRES)
    assert set(got) == {
        "a/recognition_accuracy",
        "c/recognition_accuracy",
        "mean/recognition_accuracy",
    }
    assert got["mean/recognition_accuracy"] == pytest.approx((0.75 + 0.6) / 2)
    assert evaluate.recognition_accuracy([_result("a", None)], CENTRES) == {}


def test_publish_reports_recognition_with_centres_and_several_classes(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(evaluate, "write_report", lambda *args, **kwargs: None)  # not needed
    results = _three_classes()
    values = evaluate.publish(str(tmp_path), results, {"model": "fake"}, CENTRES)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key, want in [("a", 0.75), ("b", 0.5), ("c", 0.6), ("mean", 1.85 / 3)]:
        assert values[f"{key}/recognition_accuracy"] == pytest.approx(want)
        assert saved[f"{key}/recognition_accuracy"] == pytest.approx(want)
    out = capsys.readouterr().out
    assert "class recognition (nearest class centre) on the test images: a 75.0%, b 50.0%" in out
    # one class, or no centres: nothing to recognise, no such key
    for results, centres in (([_result("a", [[1, 0, 0]])], CENTRES), (_three_classes(), None)):
        workdir = tmp_path / f"other{len(results)}"
        workdir.mkdir()
        values = evaluate.publish(str(workdir), results, {"model": "fake"}, centres)
        saved = json.loads((workdir / "metrics.json").read_text())
        assert not any("recognition" in k for k in [*values, *saved])


def test_class_centres_of_a_tiled_source_average_every_tile_of_the_class():
    """With tiles, each tile's features count for its image's class; images of mixed sizes give
    different tile counts, so the centre is the mean over tiles, not over images."""
    config = tiny.get_config()
    config.data.tile.size, config.data.tile.overlap, config.data.tile.scale = 32, 8, 1.0

    def records(sizes):
        return [
            {"image": np.zeros((*hw, 3), np.uint8), "label": 0, "filename": b"x.png"}
            for hw in sizes
        ]

    # tiles: (32, 32) -> 1, (56, 32) -> 2 (starts 0, 24), (56, 80) -> 2 x 3 (0, 24, 48)
    sources = [records([(32, 32), (56, 80)]), records([(56, 32)])]
    items = [input_pipeline.Item(1, 0), input_pipeline.Item(0, 0), input_pipeline.Item(0, 1)]
    source = input_pipeline.TiledSource(sources, items, config, ["p", "q"])
    assert len(source) == 2 + 1 + 6
    tile_class = [1, 1, 0, 0, 0, 0, 0, 0, 0]  # in record order: item q0, then p0, then p1
    rng = np.random.default_rng(0)
    # a cache of two stages, one record per tile: [N, h, w, C]
    cache = [rng.random((9, 2, 2, 3)), rng.random((9, 1, 1, 2))]
    features = np.concatenate([c.mean(axis=(1, 2)) for c in cache], axis=1)
    got = calibration.class_centres(None, cache, source, config, None)
    assert got["names"] == ["p", "q"]
    for name, c in (("p", 0), ("q", 1)):
        want = features[[k == c for k in tile_class]].mean(axis=0)
        np.testing.assert_allclose(got["centres"][got["names"].index(name)], want, rtol=1e-6)


def test_recognition_accuracy_counts_rejected_images_as_unknown():
    """With radii, an image beyond its nearest class's radius is an unknown class, as a
    deployed model decides it: not recognised, and counted in the unknown-class rate."""
    from grad_jax.evaluation.evaluate import CategoryEval, recognition_accuracy

    centres = {"names": ["a", "b"], "centres": [[0.0, 0.0], [10.0, 0.0]], "radii": [2.0, 2.0]}
    pooled = np.array([[0.5, 0.0], [1.9, 0.0], [0.0, 3.0], [9.0, 0.0]])  # a, a, far, b
    r = CategoryEval(
        np.zeros(4), np.zeros(4, np.int32), np.zeros((4, 2, 2)), np.zeros((4, 2, 2)),
        name="a", filenames=list("wxyz"), pooled=pooled,
    )  # fmt: skip
    values = recognition_accuracy([r], centres)
    assert values["a/recognition_accuracy"] == pytest.approx(2 / 4)
    assert values["a/unknown_class_rate"] == pytest.approx(1 / 4)
    assert values["mean/unknown_class_rate"] == pytest.approx(1 / 4)
