"""Model kinds (grad, knn, grad+knn): the combination against numpy, its standardisation from the
held-out normal images only, the decision figures at each class's own threshold, and a tiny run
of the combined kind through training, evaluation, the exported model and predict."""

import json

import numpy as np
import pytest
from grad_jax.configs import tiny

from grad_jax import export, predict
from grad_jax.evaluation import evaluate
from grad_jax.evaluation.evaluate import CategoryEval
from grad_jax.inference import exported_model
from grad_jax.inference.predictor import Predictor
from grad_jax.models import knn
from grad_jax.training import calibration
from tests.conftest import tiny_category


def test_the_combined_map_is_the_mean_of_the_standardised_maps():
    rng = np.random.default_rng(0)
    maps = {"grad": rng.normal(3, 2, (2, 4, 5)), "knn": rng.normal(-1, 0.5, (2, 4, 5))}
    stats = {"grad": {"mean": 3.1, "std": 1.9}, "knn": {"mean": -0.8, "std": 0.45}}
    want = ((maps["grad"] - 3.1) / 1.9 + (maps["knn"] + 0.8) / 0.45) / 2
    np.testing.assert_allclose(knn.kind_map("grad+knn", maps, stats), want, rtol=1e-12)
    assert knn.kind_map("grad", maps) is maps["grad"]
    assert knn.kind_map("knn", maps) is maps["knn"]
    with pytest.raises(ValueError, match="statistics"):
        knn.kind_map("grad+knn", maps, None)
    with pytest.raises(ValueError, match="model.kind='patchcore'"):
        knn.kind_map("patchcore", maps, stats)


def test_map_statistics_are_every_held_out_pixel_s():
    rng = np.random.default_rng(1)
    maps = [
        {"raw_grad": rng.normal(size=(4, 6)), "raw_knn": rng.gamma(2.0, size=(4, 6))}
        for _ in range(3)
    ] + [{"raw_grad": rng.normal(size=(8, 3)), "raw_knn": rng.gamma(2.0, size=(8, 3))}]
    stats = calibration.map_statistics(maps)
    for kind in ("grad", "knn"):
        pixels = np.concatenate([m[f"raw_{kind}"].ravel() for m in maps])
        assert stats[kind]["mean"] == pytest.approx(pixels.mean(), rel=1e-12)
        assert stats[kind]["std"] == pytest.approx(pixels.std(), rel=1e-9)


def _category(name, scores, labels):
    n = len(scores)
    maps = np.zeros((n, 4, 4), np.float32)
    masks = np.zeros((n, 4, 4), np.uint8)
    return CategoryEval(
        np.asarray(scores, np.float32), np.asarray(labels), maps, masks,
        name=name, filenames=[f"{name}/{i}" for i in range(n)],
    )  # fmt: skip


def test_decision_figures_at_each_class_s_own_threshold():
    a = _category("a", [0.1, 0.5, 0.7, 0.2, 0.9], [0, 0, 0, 1, 1])
    b = _category("b", [0.3, 0.35, 0.8], [0, 1, 1])
    c = _category("c", [0.45, 0.55], [0, 1])  # no class threshold: the run's
    threshold = {
        "image_score": 0.5,
        "per_category": {"a": 0.6, "b": 0.33},
        "guarantee": {
            "run": {"guarantee": 0.2},
            "per_category": {"a": {"guarantee": 0.1}, "b": {"guarantee": 0.25}},
        },
    }
    values = evaluate.decision_rates([a, b, c], threshold)
    # a at 0.6: good 0.1 0.5 0.7 -> one of three flagged; defective 0.2 0.9 -> one missed
    assert values["a/false_alarm_rate"] == pytest.approx(1 / 3)
    assert values["a/miss_rate"] == pytest.approx(1 / 2)
    assert values["a/false_alarm_guarantee"] == 0.1
    # b at 0.33: good 0.3 passed; defective 0.35 0.8 caught
    assert (values["b/false_alarm_rate"], values["b/miss_rate"]) == (0.0, 0.0)
    # c at the run's 0.5: good 0.45 passed, defective 0.55 caught; the run's guarantee
    assert (values["c/false_alarm_rate"], values["c/miss_rate"]) == (0.0, 0.0)
    assert values["c/false_alarm_guarantee"] == 0.2
    assert values["mean/false_alarm_rate"] == pytest.approx(1 / 9)
    assert values["mean/miss_rate"] == pytest.approx(1 / 6)
    assert values["mean/false_alarm_guarantee"] == pytest.approx((0.1 + 0.25 + 0.2) / 3)


@pytest.fixture(scope="module")
def combined_run(tmp_path_factory):
    """A tiny run of kind grad+knn (one epoch, 4 of 12 training images held out)."""
    from grad_jax.training import loop

    base = tmp_path_factory.mktemp("kinds")
    category = tiny_category(base / "data", num_train=12, num_test_good=3, num_test_defect=3)
    config = tiny.get_config()
    config.data.dataset, config.data.root = "folder", str(category)
    config.data.data_dir = str(base / "tfds")
    config.train.epochs = 1
    config.threshold.holdout_fraction = 0.3
    config.model.kind = "grad+knn"
    loop.train_and_evaluate(config, str(base / "run"))
    return base, category


def test_a_combined_run_reports_every_kind_and_stores_its_bank(combined_run):
    base, _ = combined_run
    saved = json.loads((base / "run" / "metrics.json").read_text())
    assert saved["kind"] == "grad+knn"
    assert sorted(saved["kinds"]) == ["grad", "grad+knn", "knn"]
    for values in saved["kinds"].values():
        assert 0 <= values["mean/image_auroc"] <= 1
        assert values["mean/false_alarm_guarantee"] == pytest.approx(1 / 5)  # 4 held out
    # the deployed kind's figures are the top-level ones
    assert saved["mean/image_auroc"] == saved["kinds"]["grad+knn"]["mean/image_auroc"]
    predictor = Predictor.from_workdir(base / "run")
    bank = predictor.meta["knn"]
    assert bank["bank_shape"][0] == int(np.ceil(0.1 * 8 * 8 * 8))  # 10% of 8 images x 8x8
    stats = bank["map_stats"]
    assert stats["grad"]["std"] > 0 and stats["knn"]["std"] > 0


def test_every_path_scores_the_combined_kind_alike(combined_run, tmp_path):
    base, category = combined_run
    predictor = Predictor.from_workdir(base / "run", batch_size=4)
    export.export_workdir(str(base / "run"), str(tmp_path / "model"), platforms=("cpu",))
    model = exported_model.load_model(tmp_path / "model", batch_size=4)
    assert model.meta["model_kind"] == "grad+knn"
    files = sorted((category / "test").rglob("*.png"))
    from grad_jax.data.images import read_image

    want = predictor.predict([read_image(f) for f in files])
    got = model.predict([read_image(f) for f in files])
    for w, g in zip(want, got, strict=True):
        assert g.score == pytest.approx(w.score, rel=2e-5, abs=1e-6)
        assert g.is_anomalous == w.is_anomalous
    assert (
        predict.main(
            [
                "predict",
                f"--model={tmp_path / 'model'}",
                f"--out={tmp_path / 'out'}",
                "--noprogress",
            ]
            + [str(f) for f in files]
        )
        == 0
    )
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()[1:]
    assert len(rows) == len(files)
