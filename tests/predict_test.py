"""grad_jax.predict: the Predictor API and `python -m grad_jax.predict` on a real tiny run."""

import csv
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from grad_jax import predict
from grad_jax.data.images import to_rgb8
from grad_jax.inference import device_program, heatmap, result_files
from grad_jax.inference.predictor import Predictor
from grad_jax.inference.scorer import Scorer
from grad_jax.runs import run_folder
from tests.conftest import ROOT, tiny_category

SIZE = (64, 64)  # configs/tiny.py


# --------------------------------------------------------------------------------------------
# Fixtures: one trained run, one folder of inputs.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    tiny_category(base)
    return base


@pytest.fixture(scope="module")
def run_dir(demo, tmp_path_factory):
    from grad_jax.configs import tiny

    from grad_jax.training import loop

    config = tiny.get_config()
    config.data.dataset = "folder"
    config.data.root = str(demo / "hex_nut")
    config.data.data_dir = str(demo / "tfds")
    config.train.epochs = 1
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def trained(run_dir):
    out = run_folder.load_trained(run_dir)
    assert out.threshold is not None and out.threshold > 0  # 1 of 8 images held out
    return out


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.from_workdir(run_dir, batch_size=4)


def _demo_image(demo, split="test/good", index=0) -> np.ndarray:
    folder = demo / "hex_nut" / split
    name = sorted(os.listdir(folder))[index]
    return np.asarray(Image.open(folder / name).convert("RGB"))


def _resize(rgb: np.ndarray, size) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


@pytest.fixture(scope="module")
def good_dir(demo, tmp_path_factory):
    """Good images in many formats and sizes; the keys the CLI must give them."""
    folder = tmp_path_factory.mktemp("good")
    rgb = _demo_image(demo)
    defect = _demo_image(demo, "test/" + _defect_name(demo))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(defect).save(folder / "defect.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rgb).save(folder / "pic.bmp")
    Image.fromarray(rgb).save(folder / "scan.tif")
    Image.fromarray(gray).save(folder / "gray.png")
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(folder / "rgba.png")
    deep = gray.astype(np.uint16) * 257 + 100  # 16-bit data, not a multiple of 257
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.fromarray(_resize(rgb, (300, 410))).save(folder / "big.png")
    Image.fromarray(_resize(rgb, (23, 31))).save(folder / "small.png")
    (folder / "sub").mkdir()
    Image.fromarray(np.ascontiguousarray(rgb[::-1])).save(folder / "sub" / "flipped.PNG")
    # never scored: hidden files and folders, non-image names
    Image.fromarray(rgb).save(folder / ".hidden.png")
    (folder / ".cache").mkdir()
    Image.fromarray(rgb).save(folder / ".cache" / "x.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _defect_name(demo) -> str:
    test = demo / "hex_nut" / "test"
    return next(d for d in sorted(os.listdir(test)) if d != "good")


GOOD_KEYS = sorted(
    [
        "big.png",
        "defect.png",
        "deep16.png",
        "gray.png",
        "photo.jpg",
        "pic.bmp",
        "rgb.png",
        "rgba.png",
        "scan.tif",
        "small.png",
        "sub/flipped.PNG",
    ]
)


# Overlays are PNGs named like their input (issue: `000.png` used to become `000.png.png`).
OVERLAY_NAMES = {
    "big.png": "big.png",
    "defect.png": "defect.png",
    "deep16.png": "deep16.png",
    "gray.png": "gray.png",
    "photo.jpg": "photo.png",
    "pic.bmp": "pic.png",
    "rgb.png": "rgb.png",
    "rgba.png": "rgba.png",
    "scan.tif": "scan.png",
    "small.png": "small.png",
    "sub/flipped.PNG": "sub/flipped.PNG",
}


def _files_under(folder) -> list[str]:
    return [
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        for d, _, files in os.walk(folder)
        for f in files
    ]


def test_overlay_names_keep_the_input_name_and_never_collide():
    keys = ["a.png", "a.jpg", "a.JPG.png", "a.jpeg", "b.bmp", "B.PNG", "c/d.tif", "e.tiff"]
    names = result_files.overlay_names(keys)
    assert names == {
        "a.png": "a.png",
        "a.JPG.png": "a.JPG.png",
        "B.PNG": "B.PNG",
        "a.jpg": "a_2.png",  # a.png and a.jpg.png (case-insensitively) are inputs already
        "a.jpeg": "a.jpeg.png",
        "b.bmp": "b.bmp.png",  # B.PNG is taken on case-insensitive file systems
        "c/d.tif": "c/d.png",
        "e.tiff": "e.png",
    }
    assert len({n.lower() for n in names.values()}) == len(keys)


@pytest.fixture(scope="module")
def bad_dir(good_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "zero.png").write_bytes(b"")
    data = (good_dir / "big.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    Image.fromarray(np.ones((8, 8), np.float32)).save(folder / "float.tif")  # mode F
    return folder


BAD_REASONS = {
    "zero.png": "empty",
    "truncated.png": "truncated",
    "text.png": "not a recognised image",
    "float.tif": "floating-point",
}


def _expected_rgb(path) -> np.ndarray:
    """The file as 8-bit RGB by plain Pillow/numpy (independent of grad_jax's conversion)."""
    image = Image.open(path)
    if image.mode == "I;16":
        eight = np.rint(np.asarray(image) / 257.0).astype(np.uint8)
        return np.repeat(eight[..., None], 3, axis=-1)
    if image.mode == "RGBA":
        return np.asarray(image)[..., :3]
    return np.asarray(image.convert("RGB"))


def _cli(argv, capsys):
    rc = predict.main(["grad_jax.predict", "--noprogress", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _read_csv(out):
    with open(os.path.join(out, "scores.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def good_run(run_dir, good_dir, tmp_path_factory):
    """The CLI once over the good folder (with its progress bar)."""
    out = tmp_path_factory.mktemp("out_good")
    rc = predict.main(["p", f"--workdir={run_dir}", f"--out={out}", str(good_dir)])
    return rc, out


# --------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------


def test_cli_writes_every_output(good_run, good_dir, trained):
    rc, out = good_run
    assert rc == 0
    header, rows = _read_csv(out)
    assert header == [
        "file",
        "path",
        "score",
        "decision",
        "threshold",
        "category",
        "calibrated",
        "overlay",
    ]
    assert [r[0] for r in rows] == GOOD_KEYS  # sorted, recursive, hidden and .txt left out
    assert [r[1] for r in rows] == [str(good_dir / k) for k in GOOD_KEYS]  # the input as given
    th = trained.threshold
    normal = np.asarray(trained.meta["threshold"]["normal_scores"]["hex_nut"])
    for _, _, score, decision, threshold, category, calibrated, _ in rows:
        assert np.isfinite(float(score))
        assert float(threshold) == th
        assert decision == ("anomalous" if float(score) >= th else "normal")
        assert category == "hex_nut"  # the run's only class
        # the conformal rank: #{held-out normal scores below} / (n + 1)
        assert float(calibrated) == np.sum(normal < float(score)) / (normal.size + 1)
    assert {r[0]: r[7] for r in rows} == OVERLAY_NAMES
    with np.load(out / "maps.npz") as maps:
        assert sorted(maps.files) == GOOD_KEYS
        for key in GOOD_KEYS:
            assert maps[key].shape == SIZE and maps[key].dtype == np.float32
    assert sorted(_files_under(out / "overlays")) == sorted(OVERLAY_NAMES.values())
    for key in GOOD_KEYS:
        with Image.open(out / "overlays" / OVERLAY_NAMES[key]) as overlay:
            with Image.open(good_dir / key) as original:
                assert overlay.size == original.size
                assert overlay.mode == "RGB"
    readme = (out / "README.txt").read_text()
    assert "vmin = 0, vmax = 2 x their threshold" in readme
    assert f"{2 * th:.6g}" in readme
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary files left


def test_cli_scores_match_predict_fn_and_api(good_run, good_dir, trained, predictor):
    """Independent check: Pillow decode + resize, then the jitted predict function itself."""
    _, out = good_run
    _, rows = _read_csv(out)
    cli_scores = {r[0]: float(r[2]) for r in rows}
    batch = np.stack([_resize(_expected_rgb(good_dir / k), SIZE) for k in GOOD_KEYS])
    expected = device_program.make_predict_fn(trained.variables, trained.config)(batch)
    got = [cli_scores[k] for k in GOOD_KEYS]
    np.testing.assert_allclose(got, expected["score"], rtol=1e-5, atol=1e-6)
    with np.load(out / "maps.npz") as maps:
        for i, key in enumerate(GOOD_KEYS):
            np.testing.assert_allclose(maps[key], expected["raw"][i], rtol=1e-5, atol=1e-6)
    # the Python API on the decoded arrays (any size) gives the same scores
    api = predictor.predict([_expected_rgb(good_dir / k) for k in GOOD_KEYS])
    np.testing.assert_allclose([p.score for p in api], got, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) > 3  # the images really differ


def test_overlay_is_the_upsampled_raw_map_in_the_threshold_range(good_run, good_dir, trained):
    _, out = good_run
    th = trained.threshold
    with np.load(out / "maps.npz") as maps:
        for key in ("big.png", "small.png", "rgb.png"):
            original = _expected_rgb(good_dir / key)
            h, w = original.shape[:2]
            up = np.asarray(Image.fromarray(maps[key]).resize((w, h), Image.BILINEAR))
            want = heatmap.overlay(original, up, 0.0, 2 * th)
            got = np.asarray(Image.open(out / "overlays" / OVERLAY_NAMES[key]))
            np.testing.assert_array_equal(got, want)


def test_bad_files_are_named_and_the_rest_scored(run_dir, good_dir, bad_dir, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "does_not_exist.png"
    rc, stdout, stderr = _cli(
        [f"--workdir={run_dir}", f"--out={out}", good_dir / "rgb.png", bad_dir, missing], capsys
    )
    assert rc == 1
    for name, why in BAD_REASONS.items():
        line = next(x for x in stderr.splitlines() if str(bad_dir / name) in x)
        assert line.startswith(f"grad_jax: cannot read {bad_dir / name}: ")
        assert why in line
    assert f"grad_jax: cannot read {missing}: no such file or folder" in stderr
    _, rows = _read_csv(out)
    assert [r[0] for r in rows] == ["rgb.png"]
    with np.load(out / "maps.npz") as maps:
        assert maps.files == ["rgb.png"]
    assert os.listdir(out / "overlays") == ["rgb.png"]
    readme = (out / "README.txt").read_text()
    assert "1 scored, 5 not scored" in readme
    assert str(missing) in readme and str(bad_dir / "zero.png") in readme
    assert "1 image(s)" in stdout


def test_only_bad_inputs_still_write_empty_outputs(run_dir, bad_dir, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    rc, _, stderr = _cli([f"--workdir={run_dir}", f"--out={out}", bad_dir, empty], capsys)
    assert rc == 1
    assert f"cannot read {empty}: the folder holds no image file" in stderr
    header, rows = _read_csv(out)
    assert header == result_files.CSV_COLUMNS and rows == []
    with np.load(out / "maps.npz") as maps:
        assert maps.files == []


def test_usage_errors_exit_2(run_dir, good_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    image = str(good_dir / "rgb.png")
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        "no images given": [f"--workdir={run_dir}", f"--out={out}"],
        "--workdir (a run folder) or --model": [f"--out={out}", image],
        "--out is required": [f"--workdir={run_dir}", image],
        "not a grad_jax run folder": [f"--workdir={not_a_run}", f"--out={out}", image],
        "no checkpoint of step 999": [f"--workdir={run_dir}", f"--out={out}", "--step=999", image],
        "--category=nope": [f"--workdir={run_dir}", f"--out={out}", "--category=nope", image],
        "either --threshold or --category": [
            f"--workdir={run_dir}",
            f"--out={out}",
            "--threshold=1",
            "--category=hex_nut",
            image,
        ],
        "--batch_size must be at least 1": [
            f"--workdir={run_dir}",
            f"--out={out}",
            "--batch_size=0",
            image,
        ],
        "is a file, not a folder": [f"--workdir={run_dir}", f"--out={a_file}", image],
        "bogus": [f"--workdir={run_dir}", f"--out={out}", "--bogus=1", image],
    }
    for message, argv in cases.items():
        rc, _, stderr = _cli(argv, capsys)
        assert rc == 2, (message, stderr)
        lines = [x for x in stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("grad_jax: error: "), stderr
        assert message in lines[0], (message, stderr)
    assert not os.path.exists(out)  # nothing written on a usage error
    assert os.listdir(not_a_run) == []  # and nothing created in a folder that is not a run


def test_threshold_override_and_category(run_dir, good_dir, trained, good_run, tmp_path, capsys):
    _, rows = _read_csv(good_run[1])
    distinct = sorted({float(r[2]) for r in rows})
    assert len(distinct) > 3
    middle = (distinct[1] + distinct[2]) / 2  # some images below it, most above
    below = sum(float(r[2]) < middle for r in rows)
    out = tmp_path / "given"
    argv = [f"--workdir={run_dir}", f"--out={out}", f"--threshold={middle}", good_dir]
    assert _cli(argv, capsys)[0] == 0
    _, rows = _read_csv(out)
    assert {r[4] for r in rows} == {repr(middle)}
    decisions = [r[3] for r in rows]
    assert decisions.count("normal") == below >= 2
    assert decisions.count("anomalous") == len(rows) - below >= 2
    for _, _, score, decision, *_ in rows:
        assert (decision == "anomalous") == (float(score) >= middle)
    readme = (out / "README.txt").read_text()
    assert f"Decision threshold: {middle!r} (given with --threshold)" in readme
    assert "vmax = 2 x their threshold" in readme

    out = tmp_path / "category"
    per_category = trained.meta["threshold"]["per_category"]["hex_nut"]
    argv = [f"--workdir={run_dir}", f"--out={out}", "--category=hex_nut", good_dir / "rgb.png"]
    assert _cli(argv, capsys)[0] == 0
    _, rows = _read_csv(out)
    assert float(rows[0][4]) == per_category
    assert "class 'hex_nut'" in (out / "README.txt").read_text()


def test_without_threshold_overlays_use_the_run_range(predictor, good_dir, tmp_path, monkeypatch):
    bare = Scorer(predictor.program, predictor.spec, {}, predictor.batch_size)  # no thresholds
    out = tmp_path / "out"
    files, failed = result_files.collect_inputs(
        [str(good_dir / "rgb.png"), str(good_dir / "big.png")]
    )
    assert failed == []
    written = result_files.write_outputs(
        bare, files, str(out), (None, "none"), lambda *a: None, progress=False
    )
    assert written == (2, [], 0)
    _, rows = _read_csv(out)
    assert [(r[3], r[4]) for r in rows] == [("", ""), ("", "")]
    with np.load(out / "maps.npz") as maps:
        lo = min(maps[k].min() for k in maps.files)
        hi = max(maps[k].max() for k in maps.files)
        readme = (out / "README.txt").read_text()
        assert f"vmin = {lo:.6g}, vmax = {hi:.6g}" in readme
        original = _expected_rgb(good_dir / "big.png")
        h, w = original.shape[:2]
        up = np.asarray(Image.fromarray(maps["big.png"]).resize((w, h), Image.BILINEAR))
        want = heatmap.overlay(original, up, lo, hi)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "overlays" / "big.png")), want)
    assert all(p.is_anomalous is None for p in bare.predict([original]))


def test_same_names_get_unique_deterministic_keys(good_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "x").mkdir(parents=True)
        (folder / "x" / "img.png").write_bytes((good_dir / "rgb.png").read_bytes())
    (b / "x" / "IMG.png").write_bytes((good_dir / "rgb.png").read_bytes())
    (b / "x" / "img_2.png").write_bytes((good_dir / "rgb.png").read_bytes())
    args = [str(a), str(b), str(a / "x" / "img.png"), str(good_dir / "rgb.png")]
    files, failed = result_files.collect_inputs(args)
    assert failed == []
    assert files == [
        (os.path.join(str(a), "x", "img.png"), "x/img.png"),
        # a case-insensitive clash; x/img_2.png is another input's own name: never given away
        (os.path.join(str(b), "x", "IMG.png"), "x/IMG_3.png"),
        (os.path.join(str(b), "x", "img.png"), "x/img_4.png"),
        (os.path.join(str(b), "x", "img_2.png"), "x/img_2.png"),
        # a/x/img.png again: the same file, scored once
        (str(good_dir / "rgb.png"), "rgb.png"),
    ]
    assert result_files.collect_inputs(args) == (files, failed)


def test_output_folder_inside_an_input_folder_is_not_scanned(good_dir, tmp_path):
    folder = tmp_path / "images"
    (folder / "results" / "overlays").mkdir(parents=True)
    for name in ("a.png", "results/overlays/a.png.png"):
        (folder / name).write_bytes((good_dir / "rgb.png").read_bytes())
    files, _ = result_files.collect_inputs([str(folder)], exclude=str(folder / "results"))
    assert [key for _, key in files] == ["a.png"]
    files, _ = result_files.collect_inputs([str(folder)])
    assert [key for _, key in files] == ["a.png", "results/overlays/a.png.png"]


def test_interrupted_run_keeps_previous_outputs(predictor, good_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    files, _ = result_files.collect_inputs([str(good_dir)])
    result_files.write_outputs(
        predictor, files[:2], str(out), (0, "x"), lambda *a: None, progress=False
    )
    before = {n: (out / n).read_bytes() for n in ("scores.csv", "maps.npz", "README.txt")}
    overlays_before = sorted(os.listdir(out / "overlays"))
    calls = []
    real = predictor.program

    class Interrupted:
        def rows(self, n):
            return real.rows(n)

        def __call__(self, x):
            calls.append(x.shape)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(x)

    monkeypatch.setattr(predictor, "program", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        result_files.write_outputs(
            predictor, files, str(out), (0, "x"), lambda *a: None, progress=False
        )
    assert len(calls) == 2
    assert {n: (out / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(out / "overlays")) == overlays_before
    assert sorted(os.listdir(out)) == ["README.txt", "maps.npz", "overlays", "scores.csv"]


# --------------------------------------------------------------------------------------------
# The Python API.
# --------------------------------------------------------------------------------------------


def test_predict_accepts_every_array_kind(predictor, demo, trained):
    rgb = _demo_image(demo)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint8)
    noisy = np.random.default_rng(1).integers(0, 256, rgb.shape, dtype=np.uint16)
    images = {
        "rgb": rgb,
        "rgba": np.concatenate([rgb, alpha], axis=-1),
        "float": rgb.astype(np.float32) / 255.0,
        "uint16 rgb": rgb.astype(np.uint16) * 256 + noisy // 256,  # high byte = rgb
        "pil": Image.fromarray(rgb),
        "gray rgb": np.repeat(gray[..., None], 3, axis=-1),
        "gray": gray,
        "gray hw1": gray[..., None],
        "gray float64": gray / 255.0,
        "uint16 gray": gray.astype(np.uint16) * 257 + 128,  # scaled (not cut) to `gray`
    }
    preds = predictor.predict(list(images.values()))
    assert len(preds) == len(images)
    score = dict(zip(images, (p.score for p in preds), strict=True))
    for name in ("rgba", "float", "uint16 rgb", "pil"):
        assert score[name] == pytest.approx(score["rgb"], rel=1e-6), name
    for name in ("gray", "gray hw1", "gray float64", "uint16 gray"):
        assert score[name] == pytest.approx(score["gray rgb"], rel=1e-6), name
    assert score["gray"] != pytest.approx(score["rgb"], rel=1e-6)
    for p in preds:
        assert isinstance(p.score, float)
        assert p.anomaly_map.shape == SIZE and p.anomaly_map.dtype == np.float32
        assert p.is_anomalous == (p.score >= trained.threshold)
    assert predictor.threshold == trained.threshold
    # a [N, H, W, C] array is N images
    stacked = predictor.predict(np.stack([rgb, rgb[::-1]]))
    assert stacked[0].score == pytest.approx(score["rgb"], rel=1e-6)
    assert predictor.predict([]) == []


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10, 2), np.uint8), "shape"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.full((10, 10), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((10, 10), np.nan, np.float32), "NaN"),
        (np.zeros((10, 10), np.int64), "dtype"),
    ],
)
def test_predict_rejects_bad_arrays(predictor, image, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict([np.zeros((10, 10), np.uint8), image])


def test_predict_rejects_a_bare_image(predictor):
    with pytest.raises(ValueError, match="wrap a single image in a list"):
        predictor.predict(np.zeros((64, 64, 3), np.uint8))


def test_one_program_for_all_batches(predictor, demo, monkeypatch):
    images = [_demo_image(demo, "train/good", i) for i in range(5)] + [np.zeros((9, 7), np.uint8)]
    alone = [predictor.predict([im])[0].score for im in images[:2]]
    shapes = []
    real = predictor.program

    class Spy:
        def rows(self, n):
            return real.rows(n)

        def __call__(self, x):
            shapes.append((x.shape, x.dtype))
            return real(x)

    monkeypatch.setattr(predictor, "program", Spy())
    preds = predictor.predict(images)
    assert len(preds) == 6
    assert shapes == [((4, *SIZE, 3), np.uint8)] * 2  # 6 images -> 4 + 4 (2 padded)
    np.testing.assert_allclose([p.score for p in preds[:2]], alone, rtol=1e-6)


def test_predict_files(predictor, good_dir, bad_dir, tmp_path):
    paths = [
        good_dir / "gray.png",
        bad_dir / "zero.png",
        good_dir / "deep16.png",
        tmp_path / "missing.png",
        bad_dir / "text.png",
        good_dir / "big.png",
    ]
    ok, failed = predictor.predict_files(paths)
    assert [p for p, _ in ok] == [str(paths[i]) for i in (0, 2, 5)]
    assert [p for p, _ in failed] == [str(paths[i]) for i in (1, 3, 4)]
    reasons = dict(failed)
    assert "empty" in reasons[str(paths[1])]
    assert "cannot read the file" in reasons[str(paths[3])]
    assert "not a recognised image" in reasons[str(paths[4])]
    arrays = predictor.predict([_expected_rgb(paths[i]) for i in (0, 2, 5)])
    np.testing.assert_allclose(
        [p.score for _, p in ok], [p.score for p in arrays], rtol=1e-5, atol=1e-6
    )
    for (_, p), q in zip(ok, arrays, strict=True):
        np.testing.assert_allclose(p.anomaly_map, q.anomaly_map, rtol=1e-5, atol=1e-6)


def test_from_workdir_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a grad_jax run folder"):
        Predictor.from_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"available steps: \d+"):
        Predictor.from_workdir(run_dir, step=12345)
    with pytest.raises(predict.UsageError):
        Predictor.from_workdir(run_dir, batch_size=0)


# --------------------------------------------------------------------------------------------
# The real entry point, in a fresh process.
# --------------------------------------------------------------------------------------------


def test_module_entry_point(run_dir, good_dir, good_run, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [f"--workdir={run_dir}", f"--out={out}", "--batch_size=2", str(good_dir / "gray.png")]
    missing = tmp_path / "nope.png"
    proc = subprocess.run(
        [sys.executable, "-m", "grad_jax.predict", *args, str(missing)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # one input missing
    assert f"grad_jax: cannot read {missing}: no such file or folder" in proc.stderr
    assert re.search(r"predict: 100%.*1/1", proc.stderr)  # the progress bar
    _, rows = _read_csv(out)
    reference = {r[0]: float(r[2]) for r in _read_csv(good_run[1])[1]}
    assert [r[0] for r in rows] == ["gray.png"]
    assert float(rows[0][2]) == pytest.approx(reference["gray.png"], rel=1e-5)


def test_to_rgb8_rejects_unsupported_pillow_modes():
    image = Image.open(io.BytesIO(_float_tiff()))
    with pytest.raises(ValueError, match="floating-point"):
        to_rgb8(image)


def _float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ones((4, 4), np.float32)).save(buffer, format="TIFF")
    return buffer.getvalue()
