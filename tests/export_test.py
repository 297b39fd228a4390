"""grad_jax.export + grad_jax.inference.exported_model: the exported model scores like
Predictor, loads with jax alone, refuses damaged or foreign files clearly, and decides per class."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export
from PIL import Image

from grad_jax import export, predict
from grad_jax.inference import exported_model
from grad_jax.inference.predictor import Predictor
from grad_jax.inference.scorer import Scorer
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
    predictor = Predictor.from_workdir(run_dir, batch_size=batch_size)
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
    for name in CLASSES:  # each per-class threshold: the conformal rank of its stored scores
        scores = sorted(th["normal_scores"][name])
        k = math.ceil((len(scores) + 1) * (1 - th["target_false_alarm"]))
        assert th["per_category"][name] == scores[min(k, len(scores)) - 1]
    assert meta["class_centres"]["names"] == list(CLASSES)
    radii = run_folder.load_trained(run_dir).meta["class_centres"]["radii"]
    assert meta["class_centres"]["radii"] == radii and len(radii) == 2  # carried into meta.json
    assert meta["config_fingerprint"]["data.image_size"] == [64, 64]


def test_class_centres_are_the_mean_pooled_features_of_the_training_images(run_dir):
    """Centres (computed at training time from the feature cache) against the predict
    program's pooled output on the same training images (the held-out ones excluded)."""
    from grad_jax.data import input_pipeline

    config = run_folder.read_config(run_dir)
    predictor = Predictor.from_workdir(run_dir, batch_size=16)
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
        mine = pooled[labels == c].astype(np.float64)
        np.testing.assert_allclose(centres["centres"][c], mine.mean(0), rtol=1e-4, atol=1e-5)
        # the rejection radius: the margin times the farthest training image from the centre
        farthest = max(np.linalg.norm(x - mine.mean(0)) for x in mine)
        assert centres["spread"][c] == pytest.approx(farthest, rel=1e-4)
        assert centres["radii"][c] == pytest.approx(config.threshold.class_margin * farthest)
    assert config.threshold.class_margin == 1.5
    # runs without the feature cache compute them with one backbone pass: the same centres
    from grad_jax.devices import sharding

    trained = run_folder.load_trained(run_dir)
    uncached = calibration.class_centres(
        trained.variables, None, source, config, sharding.make_mesh()
    )
    assert uncached["names"] == centres["names"] and uncached["num_images"] == [7, 7]
    np.testing.assert_allclose(uncached["centres"], centres["centres"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(uncached["radii"], centres["radii"], rtol=1e-4)


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


def test_decisions_per_class(model_dir, images, data):
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
            # the conformal rank: #{held-out normal scores below} / (n + 1)
            assert p.calibrated == np.sum(normal < p.score) / (normal.size + 1)
    for name in CLASSES:
        files = sorted((data / name / "test").rglob("*.png"))
        recognised = model.predict([Image.open(f) for f in files])
        assert {(p.category, p.category_source) for p in recognised} == {(name, "recognised")}
    noise = model.predict(images[:2])  # random pixels: no kind of part the model knows
    assert all(p.unknown_class and p.category is None and p.is_anomalous is None for p in noise)
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
        assert {p.category_source for p in got} == {"recognised"}  # none rejected as unknown
        accuracies.append(np.mean([p.category == name for p in got]))
        assert metrics[f"{name}/recognition_accuracy"] == pytest.approx(accuracies[-1])
    assert metrics["mean/recognition_accuracy"] == pytest.approx(np.mean(accuracies))


def test_an_image_beyond_the_radius_is_an_unknown_class(model_dir, data):
    """The trained radii keep a training image known; shrunk below its distance, the same
    image is rejected as an unknown class (no threshold, no decision)."""
    model = exported_model.load_model(model_dir)
    image = Image.open(sorted((data / "wood" / "train").rglob("*.png"))[0])
    (known,) = model.predict([image])
    assert (known.category, known.category_source) == ("wood", "recognised")
    centres = {**model.meta["class_centres"], "radii": [1e-6, 1e-6]}
    strict = Scorer(model.program, model.spec, {**model.meta, "class_centres": centres}, 4)
    (p,) = strict.predict([image])
    assert p.ok and p.category is None and p.category_source == "unknown class"
    assert p.is_anomalous is None and p.threshold is None and "beyond" in p.threshold_source


# --------------------------------------------------------------------------------------------
# Non-finite scores (issue 18, item 2): the exported model marks them as Predictor does.
# --------------------------------------------------------------------------------------------


def test_a_non_finite_score_is_an_error_for_that_image(model_dir, images, monkeypatch):
    model = exported_model.load_model(model_dir, batch_size=4)
    real = model.program

    class NanForSecondRow:
        def rows(self, n):
            return real.rows(n)

        def __call__(self, x):
            out = dict(real(x))
            out["score"] = out["score"].copy()
            out["score"][1] = np.nan
            return out

    want = model.predict(images[:3])
    monkeypatch.setattr(model, "program", NanForSecondRow())
    got = model.predict(images[:3])
    assert [p.ok for p in got] == [True, False, True]
    assert "non-finite score" in got[1].error and got[1].is_anomalous is None
    for i in (0, 2):
        assert got[i].score == want[i].score and got[i].is_anomalous == want[i].is_anomalous


# --------------------------------------------------------------------------------------------
# What loading a model folder trusts (issue 18, item 11).
# --------------------------------------------------------------------------------------------


def _replace_program(folder, exported):
    """Put another program into the folder, with a consistent sha256 in meta.json."""
    path = folder / exported_model.MODEL_FILE
    path.write_bytes(exported.serialize())
    _edit_meta(folder, model_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _program(hw=(64, 64), width=None, score_dtype=jnp.float32, extra=None):
    """A stand-in predict program: uint8 [n, h, w, 3] -> raw, smoothed, score, pooled."""
    (n,) = jax_export.symbolic_shape("n")

    def predict(x):
        gray = x.astype(jnp.float32).mean(-1)
        if extra is not None:
            gray = gray + extra(x)
        return {
            "raw": gray,
            "smoothed": gray,
            "score": gray.mean((1, 2)).astype(score_dtype),
            "pooled": jnp.zeros((x.shape[0], width), jnp.float32),
        }

    spec = jax.ShapeDtypeStruct((n, *hw, 3), jnp.uint8)
    return jax_export.export(jax.jit(predict), platforms=("cpu",))(spec)


def _pooled_width(model_dir):
    meta = json.loads(open(os.path.join(model_dir, exported_model.META_FILE)).read())
    return len(meta["class_centres"]["centres"][0])


def test_a_program_of_another_shape_is_refused(model_dir, tmp_path):
    width = _pooled_width(model_dir)
    cases = {
        "input": (_program((32, 32), width), r"takes uint8\[n,32,32,3\].*\[n, 64, 64, 3\]"),
        "dtype": (_program(width=width, score_dtype=jnp.float16), r"'score' float16\[n\]"),
        "pooled": (_program(width=width + 1), rf"'pooled' float32\[n,{width + 1}\]"),
    }
    for name, (program, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        _replace_program(folder, program)
        with pytest.raises(exported_model.ModelFileError, match=message):
            exported_model.load_model(folder)
    folder = tmp_path / "fits"  # guards the cases: the same stand-in with the right shapes loads
    shutil.copytree(model_dir, folder)
    _replace_program(folder, _program(width=width))
    assert exported_model.load_model(folder).predict(images_of(1))[0].ok


def images_of(n):
    return [np.full((10, 12, 3), 7 * i, np.uint8) for i in range(n)]


def test_custom_calls_outside_the_allow_list_are_refused(model_dir, tmp_path):
    def solve(x):  # LAPACK on cpu: a custom call our own exports never make
        m = jnp.eye(3) + x[:1, :3, :3, 0].astype(jnp.float32)[0] / 1000
        return jnp.linalg.inv(m)[0, 0] * 0

    folder = _copy(model_dir, tmp_path)
    _replace_program(folder, _program(width=_pooled_width(model_dir), extra=solve))
    with pytest.raises(exported_model.ModelFileError, match="lapack_sgetrf_ffi.*shape_assertion"):
        exported_model.load_model(folder)


def test_the_allow_list_is_what_our_exports_use(model_dir):
    exported = jax_export.deserialize(
        bytearray(open(os.path.join(model_dir, exported_model.MODEL_FILE), "rb").read())
    )
    targets = exported_model.custom_call_targets(exported.mlir_module())
    assert targets == {"shape_assertion"} == set(exported_model.ALLOWED_CUSTOM_CALLS)
    with pytest.raises(ValueError, match="cannot tell"):
        exported_model.custom_call_targets('"stablehlo.custom_call"(%0) {x}')


def test_effects_and_host_transfers_are_refused(model_dir):
    exported = jax_export.deserialize(
        bytearray(open(os.path.join(model_dir, exported_model.MODEL_FILE), "rb").read())
    )
    meta = json.loads(open(os.path.join(model_dir, exported_model.META_FILE)).read())

    class WithEffects:
        def __getattr__(self, name):
            return getattr(exported, name)

        ordered_effects = ("an io_callback",)

    with pytest.raises(exported_model.ModelFileError, match="effects"):
        exported_model.check_program(WithEffects(), meta, "m")

    class Callback(WithEffects):
        ordered_effects = ()

        def mlir_module(self):
            return (
                exported.mlir_module()
                + "\n%9 = stablehlo.custom_call @xla_ffi_python_cpu_callback(%0)"
            )

    with pytest.raises(exported_model.ModelFileError, match="xla_ffi_python_cpu_callback"):
        exported_model.check_program(Callback(), meta, "m")

    class Outfeed(Callback):
        def mlir_module(self):
            return exported.mlir_module() + '\n%9 = "stablehlo.outfeed"(%0, %1)'

    with pytest.raises(exported_model.ModelFileError, match="outfeed"):
        exported_model.check_program(Outfeed(), meta, "m")
    exported_model.check_program(exported, meta, "m")  # the real one passes


def test_a_pinned_digest_refuses_an_edited_threshold(model_dir, tmp_path):
    digest = exported_model.folder_digest(model_dir)
    meta_bytes = open(os.path.join(model_dir, exported_model.META_FILE), "rb").read()
    assert digest == hashlib.sha256(meta_bytes).hexdigest()  # sha256sum meta.json
    pinned = exported_model.load_model(model_dir, expected_sha256=digest.upper())
    assert pinned.categories == list(CLASSES)

    folder = _copy(model_dir, tmp_path)
    meta = json.loads((folder / exported_model.META_FILE).read_text())
    meta["threshold"]["per_category"] = {k: 1e9 for k in meta["threshold"]["per_category"]}
    (folder / exported_model.META_FILE).write_text(json.dumps(meta))
    edited = exported_model.load_model(folder)  # unpinned: a folder is trusted as it is
    assert edited.category_thresholds == {k: 1e9 for k in CLASSES}
    with pytest.raises(exported_model.ModelFileError, match="meta.json has sha256 .* pinned"):
        exported_model.load_model(folder, expected_sha256=digest)
    program_sha = meta["model_sha256"]
    with pytest.raises(exported_model.ModelFileError, match="model.jaxexport alone"):
        exported_model.load_model(model_dir, expected_sha256=program_sha)
    with pytest.raises(exported_model.ModelFileError, match="64 hexadecimal"):
        exported_model.load_model(model_dir, expected_sha256="abc")


def test_export_prints_the_digest_and_predict_checks_it(run_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert export.main(["export", f"--workdir={run_dir}", f"--out={out}", "--platforms=cpu"]) == 0
    digest = hashlib.sha256((out / exported_model.META_FILE).read_bytes()).hexdigest()
    assert f"--model_sha256={digest}" in capsys.readouterr().out

    image = tmp_path / "a.png"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(image)
    base = ["predict", "--noprogress", f"--model={out}"]
    assert (
        predict.main([*base, f"--out={tmp_path / 'ok'}", f"--model_sha256={digest}", str(image)])
        == 0
    )
    wrong = "0" * 64
    rc = predict.main([*base, f"--out={tmp_path / 'bad'}", f"--model_sha256={wrong}", str(image)])
    err = capsys.readouterr().err
    assert rc == 2 and "pinned" in err and not os.path.exists(tmp_path / "bad")
    run = ["predict", f"--workdir={run_dir}", f"--out={tmp_path / 'r'}", f"--model_sha256={digest}"]
    assert predict.main([*run, str(image)]) == 2
    assert "--model_sha256 pins an exported model folder" in capsys.readouterr().err


def test_the_platform_is_compared_as_jax_export_names_it(model_dir, monkeypatch):
    """On an NVIDIA GPU jax.default_backend() says 'gpu' while an exported program lists 'cuda':
    the loader must compare jax.export's own name for this machine, and name both sides."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax_export, "default_export_platform", lambda: "cuda")
    assert exported_model.export_platform() == "cuda"
    model = exported_model.load_model(model_dir)  # lowered for cpu, cuda and tpu: accepted
    assert "cuda" in model.meta["platforms"]
    with pytest.raises(
        exported_model.ModelFileError, match="lowered for cpu, and this machine runs cuda"
    ):
        exported_model.check_platform(("cpu",), "cuda", "model.jaxexport")
    exported_model.check_platform(("cpu", "cuda"), "cuda", "model.jaxexport")
