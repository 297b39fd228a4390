"""grad_jax.export + grad_jax.inference.exported_model: the exported model scores like
Predictor, loads with jax alone, refuses damaged or foreign files clearly, and decides per class."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from grad_jax import export, predict
from grad_jax.inference import exported_model
from grad_jax.runs import run_folder
from grad_jax.training import calibration
from tests.conftest import ROOT

CLASSES = ("hex_nut", "wood")
HEAVY = ("flax", "optax", "orbax", "tensorflow_datasets", "grain", "ml_collections", "torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from grad_jax.data import demo

    base = tmp_path_factory.mktemp("data")
    demo.generate_demo_dataset(
        base, classes=CLASSES, num_train=8, num_test_good=1, num_test_defect=1,
        image_size=80, progress=False,
    )  # fmt: skip
    return base


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A unified tiny run on two classes (its final checkpoint stores centres and scores)."""
    from grad_jax.configs import tiny

    from grad_jax.training import loop

    config = tiny.get_config()
    config.data.dataset = "folder"
    config.data.root = str(data)
    config.data.data_dir = str(data / "tfds")
    config.train.epochs = 1
    config.eval.smooth_size = 7  # odd window, smaller than the map: padding matters
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def model_dir(run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("model"))
    assert export.main(["export", f"--workdir={run_dir}", f"--out={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def images():
    """Several sizes and modes, as Predictor takes them."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    return [
        rgb,
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),  # already at the model size
        rng.integers(0, 256, (120, 37), dtype=np.uint8),  # gray
        rng.random((33, 70, 4)),  # float RGBA
        rng.integers(0, 65536, (40, 41), dtype=np.uint16),  # 16-bit gray
        Image.fromarray(rgb).convert("P"),  # palette
        np.asarray(Image.fromarray(rgb).resize((200, 150))),  # large
    ]


def _box_mean_same(x, k):
    """Zero-padded k x k box mean with divisor k*k (numpy reference)."""
    p = k // 2
    padded = np.pad(x.astype(np.float64), p)
    out = np.zeros_like(x, np.float64)
    for dy in range(k):
        for dx in range(k):
            out += padded[dy : dy + x.shape[0], dx : dx + x.shape[1]]
    return out / (k * k)


def _score(smoothed, k):
    h, w = smoothed.shape
    return max(
        smoothed[y : y + k, x : x + k].mean() for y in range(h - k + 1) for x in range(w - k + 1)
    )


@pytest.mark.parametrize("batch_size", [1, 3])
def test_exported_matches_predictor(run_dir, model_dir, images, batch_size):
    predictor = predict.Predictor.from_workdir(run_dir, batch_size=batch_size)
    model = exported_model.load_model(model_dir, batch_size=batch_size)
    want = predictor.predict(images)
    got = model.predict(images)
    assert len(got) == len(want) == len(images)
    diffs = []
    for g, w in zip(got, want, strict=True):
        assert g.anomaly_map.shape == (64, 64) and g.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=1e-5, atol=1e-6)
        assert g.score == pytest.approx(w.score, rel=1e-5, abs=1e-6)
        assert (g.category, g.calibrated, g.threshold) == (w.category, w.calibrated, w.threshold)
        assert g.is_anomalous == w.is_anomalous and g.threshold_source == w.threshold_source
        diffs.append(float(np.abs(g.anomaly_map - w.anomaly_map).max()))
    assert len({round(p.score, 6) for p in got}) > 3  # the images really differ
    print(f"batch {batch_size}: max |map diff| {max(diffs):.3g}")


def test_smoothed_map_and_score_follow_the_reference_recipe(model_dir, images):
    """The exported outputs against numpy: 7x7 zero-padded box mean, max of 8x8 'valid' means."""
    model = exported_model.load_model(model_dir)
    x = np.stack([model.prepare(im) for im in images[:3]])
    out = model.run(x)
    assert out["raw"].shape == (3, 64, 64) and out["score"].shape == (3,)
    for i in range(3):
        smoothed = _box_mean_same(out["raw"][i], 7)
        np.testing.assert_allclose(out["smoothed"][i], smoothed, rtol=1e-5, atol=1e-7)
        assert out["score"][i] == pytest.approx(_score(smoothed, 8), rel=1e-5)


def test_meta_describes_the_model(run_dir, model_dir):
    with open(os.path.join(model_dir, exported_model.META_FILE)) as f:
        meta = json.load(f)
    assert meta["input"]["image_size"] == [64, 64] and meta["input"]["dtype"] == "uint8"
    assert "Pillow bilinear" in meta["input"]["resize"]
    assert meta["categories"] == list(CLASSES)
    assert sorted(meta["platforms"]) == ["cpu", "cuda", "tpu"]
    assert meta["jax_version"] == jax.__version__
    assert meta["model_sha256"] == exported_model.sha256_of(
        os.path.join(model_dir, exported_model.MODEL_FILE)
    )
    th = meta["threshold"]
    assert sorted(th["per_category"]) == list(CLASSES)
    for name in CLASSES:  # each per-class threshold is the quantile of its stored scores
        scores = th["normal_scores"][name]
        assert th["per_category"][name] == pytest.approx(np.quantile(scores, th["quantile"]))
    assert meta["class_centres"]["names"] == list(CLASSES)
    assert meta["config_fingerprint"]["data.image_size"] == [64, 64]


def test_class_centres_are_the_mean_pooled_features_of_the_training_images(run_dir):
    """Centres (computed at training time from the feature cache) against the predict
    program's pooled output on the same training images (the held-out ones excluded)."""
    from grad_jax.data import input_pipeline

    config = run_folder.read_config(run_dir)
    predictor = predict.Predictor.from_workdir(run_dir, batch_size=16)
    categories = input_pipeline.open_categories(config)
    train_items, held = input_pipeline.split_holdout(
        categories, config.threshold.holdout_fraction, config.seed
    )
    assert len(held) == 2
    source = input_pipeline.IndexedSource(
        [c.train for c in categories], train_items, config.data.image_size, list(CLASSES)
    )
    x = np.stack([source[i]["image"] for i in range(len(source))])
    pooled = predictor.program(x)["pooled"]
    labels = np.array([item.category for item in train_items])
    centres = predictor.meta["class_centres"]
    assert centres["num_images"] == [7, 7]
    for c in range(len(CLASSES)):
        np.testing.assert_allclose(
            centres["centres"][c], pooled[labels == c].mean(0), rtol=1e-4, atol=1e-5
        )
    # runs without the feature cache compute them with one backbone pass: the same centres
    from grad_jax.devices import sharding

    trained = run_folder.load_trained(run_dir)
    uncached = calibration.class_centres(
        trained.variables, None, source, config, sharding.make_mesh()
    )
    assert uncached["names"] == centres["names"] and uncached["num_images"] == [7, 7]
    np.testing.assert_allclose(uncached["centres"], centres["centres"], rtol=1e-4, atol=1e-5)


def test_loader_imports_no_training_stack(model_dir):
    code = (
        "import sys, numpy as np\n"
        "from grad_jax.inference.exported_model import load_model\n"
        f"m = load_model({model_dir!r})\n"
        "p = m.predict([np.zeros((30, 40, 3), np.uint8)])[0]\n"
        "print(p.category, round(p.score, 6))\n"
        f"bad = sorted({{k.split('.')[0] for k in sys.modules}} & set({HEAVY!r}))\n"
        "print('HEAVY', bad)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def _copy(model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def _edit_meta(folder, **changes):
    path = folder / exported_model.META_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_damaged_file_is_named(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    path = folder / exported_model.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        exported_model.ModelFileError, match="model.jaxexport is damaged: its sha256"
    ):
        exported_model.load_model(folder)


def test_unreadable_serialisation_is_explained(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    path = folder / exported_model.MODEL_FILE
    path.write_bytes(path.read_bytes()[:1000])
    _edit_meta(
        folder, model_sha256=exported_model.sha256_of(path)
    )  # consistent digest, broken body
    with pytest.raises(
        exported_model.ModelFileError, match="cannot be read by jax .* export it again"
    ):
        exported_model.load_model(folder)


@pytest.mark.parametrize(
    "version, advice", [(3, "upgrade grad_jax"), (0, "export the model again")]
)
def test_other_format_versions_are_refused(model_dir, tmp_path, version, advice):
    folder = _copy(model_dir, tmp_path)
    _edit_meta(folder, format_version=version)
    with pytest.raises(exported_model.ModelFileError, match=f"format version {version}.*{advice}"):
        exported_model.load_model(folder)


def test_version_1_folders_take_their_scoring_from_the_config(model_dir, tmp_path):
    """Folders exported before meta.json held "scoring" still load, with the same geometry."""
    folder = _copy(model_dir, tmp_path)
    meta = json.loads((folder / exported_model.META_FILE).read_text())
    spec = meta.pop("scoring")
    meta["format_version"] = 1
    (folder / exported_model.META_FILE).write_text(json.dumps(meta))
    old = exported_model.load_model(folder)
    assert old.spec.to_meta() == spec


def test_outside_the_jax_compatibility_window(model_dir, monkeypatch):
    from jax import export as jax_export

    exported = jax_export.deserialize(
        bytearray(open(os.path.join(model_dir, exported_model.MODEL_FILE), "rb").read())
    )
    version = exported.calling_convention_version
    monkeypatch.setattr(jax_export, "minimum_supported_calling_convention_version", version + 1)
    monkeypatch.setattr(jax_export, "maximum_supported_calling_convention_version", version + 2)
    with pytest.raises(exported_model.ModelFileError, match="outside jax's compatibility window"):
        exported_model.load_model(model_dir)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(exported_model.ModelFileError, match="not an exported grad_jax model"):
        exported_model.load_model(tmp_path)


def test_decisions_per_class(model_dir, images):
    model = exported_model.load_model(model_dir)
    meta = model.meta
    th = meta["threshold"]
    for name in CLASSES:
        out = model.predict(images[:2], categories=name)
        for p in out:
            assert p.category == name and p.category_source == "given"
            assert p.threshold == th["per_category"][name]
            assert p.is_anomalous == (p.score >= p.threshold)
            normal = np.asarray(th["normal_scores"][name])
            assert p.calibrated == np.mean(normal < p.score)
    recognised = model.predict(images[:2])
    assert all(p.category in CLASSES and p.category_source == "recognised" for p in recognised)
    with pytest.raises(ValueError, match="unknown class 'bottle'"):
        model.predict(images[:1], categories="bottle")


def test_recognition_unavailable_for_models_without_centres(model_dir, tmp_path, images):
    folder = _copy(model_dir, tmp_path)
    _edit_meta(folder, class_centres=None)
    (p,) = exported_model.load_model(folder).predict(images[:1])
    assert p.category is None and "recognition is unavailable" in p.threshold_source


def test_cli_usage_errors(tmp_path, capsys):
    assert export.main(["export", f"--out={tmp_path}"]) == 2
    assert "--workdir is required" in capsys.readouterr().err
    assert export.main(["export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"]) == 2
    assert "not a grad_jax run folder" in capsys.readouterr().err


def test_recognition_accuracy_in_metrics_matches_the_exported_model(run_dir, model_dir, data):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    model = exported_model.load_model(model_dir)
    accuracies = []
    for name in CLASSES:
        files = sorted((data / name / "test").rglob("*.png"))
        got = model.predict([Image.open(f) for f in files])
        accuracies.append(np.mean([p.category == name for p in got]))
        assert metrics[f"{name}/recognition_accuracy"] == pytest.approx(accuracies[-1])
    assert metrics["mean/recognition_accuracy"] == pytest.approx(np.mean(accuracies))
