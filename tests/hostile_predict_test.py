"""The scorer and `python -m grad_jax.predict` on unlucky and hostile input (issue 18): a
non-finite score, folders that hold the same relative names, a reused --out, file names that a
spreadsheet would run as formulas, formats outside the training ones, an unknown kind of part.

The model is a stand-in device program (no training, no backbone): what is tested is everything
around the program, which `Predictor`, the exported model, the service and predict share (the
one scorer), and the expected values are computed here from the images' colours.
"""

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from grad_jax import predict
from grad_jax.inference import result_files
from grad_jax.inference.scorer import Scorer, ScoringSpec

SIZE = (16, 16)
NAN_COLOUR = (1, 2, 3)  # an image of this colour scores NaN
THRESHOLD = 0.5


class FakeProgram:
    """A device program: each image's raw (and smoothed) map is its gray level / 255, its score
    the map's mean, its pooled feature its mean colour / 255; an image of `NAN_COLOUR` scores
    NaN (a model that overflowed on it)."""

    def __init__(self):
        self.calls = []

    def rows(self, n: int) -> int:
        return n

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(x.shape)
        x = np.asarray(x, np.float64)
        raw = (x.mean(-1) / 255).astype(np.float32)
        score = raw.mean((1, 2))
        score[(x[:, 0, 0] == NAN_COLOUR).all(-1)] = np.nan
        pooled = (x.mean((1, 2)) / 255).astype(np.float32)
        return {"raw": raw, "smoothed": raw, "score": score.astype(np.float32), "pooled": pooled}


def _meta(**extra):
    meta = {
        "categories": ["part"],
        "threshold": {
            "image_score": THRESHOLD,
            "quantile": 0.99,
            "per_category": {"part": THRESHOLD},
            "normal_scores": {"part": [0.1, 0.2, 0.3, 0.4]},
        },
    }
    meta.update(extra)
    return meta


def _scorer(meta=None, batch_size=3) -> Scorer:
    return Scorer(
        FakeProgram(), ScoringSpec(SIZE, 1, 1), _meta() if meta is None else meta, batch_size
    )


def _image(colour, hw=(20, 30)) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (*hw, 3)).copy()


def _score_of(colour) -> float:
    """The fake program's score of a uniform image of `colour` (resizing keeps it uniform)."""
    return float(np.float32(np.mean(colour) / 255))


def _save(path, colour, hw=(20, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(colour, hw)).save(path, format=fmt)
    return path


def _cli(argv, scorer, monkeypatch, capsys):
    monkeypatch.setattr(predict, "load_scorer", lambda *a, **k: scorer)
    rc = predict.main(["predict", "--noprogress", "--workdir=unused", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _rows(out):
    with open(os.path.join(out, "scores.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# Item 2: a non-finite score is an error for that image.
# --------------------------------------------------------------------------------------------


def test_a_non_finite_score_in_a_batch_is_an_error_for_that_image_only():
    scorer = _scorer()
    colours = [(200, 200, 200), NAN_COLOUR, (10, 20, 30), (90, 90, 90)]
    out = scorer.predict([_image(c) for c in colours])
    assert scorer.program.calls == [(3, *SIZE, 3), (1, *SIZE, 3)]  # NaN in the first batch
    assert [p.ok for p in out] == [True, False, True, True]
    bad = out[1]
    assert "non-finite score" in bad.error
    assert (bad.is_anomalous, bad.threshold, bad.calibrated) == (None, None, None)
    for p, colour in zip([out[0], *out[2:]], [colours[0], *colours[2:]], strict=True):
        assert p.score == pytest.approx(_score_of(colour), rel=1e-6)
        assert p.is_anomalous == (p.score >= THRESHOLD) and p.threshold == THRESHOLD


def test_predict_files_names_the_file_with_a_non_finite_score(tmp_path):
    good = _save(tmp_path / "good.png", (60, 60, 60))
    bad = _save(tmp_path / "bad.png", NAN_COLOUR)
    ok, failed = _scorer().predict_files([good, bad])
    assert [path for path, _ in ok] == [str(good)]
    assert [path for path, _ in failed] == [str(bad)]
    assert "non-finite score" in failed[0][1]


def test_predict_names_the_file_exits_1_and_writes_only_real_results(tmp_path, monkeypatch, capsys):
    a = _save(tmp_path / "in" / "a.png", (200, 200, 200))
    bad = _save(tmp_path / "in" / "b_nan.png", NAN_COLOUR)
    c = _save(tmp_path / "in" / "c.png", (10, 20, 30))
    out = tmp_path / "out"
    rc, stdout, stderr = _cli([f"--out={out}", tmp_path / "in"], _scorer(), monkeypatch, capsys)
    assert rc == 1
    line = next(x for x in stderr.splitlines() if str(bad) in x)
    assert line.startswith(f"grad_jax: cannot score {bad}: ") and "non-finite score" in line
    rows = _rows(out)
    assert [r["file"] for r in rows] == ["a.png", "c.png"]
    assert [r["path"] for r in rows] == [str(a), str(c)]
    for r, colour in zip(rows, [(200, 200, 200), (10, 20, 30)], strict=True):
        assert float(r["score"]) == pytest.approx(_score_of(colour), rel=1e-6)
    with np.load(out / "maps.npz") as maps:
        assert sorted(maps.files) == ["a.png", "c.png"]
    assert sorted(os.listdir(out / "overlays")) == ["a.png", "c.png"]
    readme = (out / "README.txt").read_text()
    assert "2 scored, 1 not scored" in readme and f"{bad}: the model gave" in readme
    assert "1 not scored" in stdout


# --------------------------------------------------------------------------------------------
# Item 3: every row names its source; output names never collide with a real input's name.
# --------------------------------------------------------------------------------------------


def test_same_relative_names_in_two_folders_are_attributed_to_their_own_files(
    tmp_path, monkeypatch, capsys
):
    colours = {
        "lotB/cam/part1.png": (250, 250, 250),
        "lotA/cam/part1.png": (10, 10, 10),
        "lotA/cam/part1_2.png": (130, 130, 130),
    }
    for rel, colour in colours.items():
        _save(tmp_path / rel, colour)
    out = tmp_path / "out"
    args = [f"--out={out}", tmp_path / "lotB", tmp_path / "lotA"]
    rc, _, stderr = _cli(args, _scorer(), monkeypatch, capsys)
    assert rc == 0, stderr
    rows = _rows(out)
    given = {str(tmp_path / rel): colour for rel, colour in colours.items()}
    assert sorted(r["path"] for r in rows) == sorted(given)  # each input once, as given
    natural = {"cam/part1.png", "cam/part1_2.png"}  # the inputs' own relative names
    keys = [r["file"] for r in rows]
    assert len({k.lower() for k in keys}) == 3
    with np.load(out / "maps.npz") as maps:
        for r in rows:
            colour = given[r["path"]]
            assert float(r["score"]) == pytest.approx(_score_of(colour), rel=1e-6), r
            np.testing.assert_allclose(maps[r["file"]], np.mean(colour) / 255, rtol=1e-6)
            if r["file"] in natural:  # a real name only for the file that has it
                assert r["path"].endswith(os.path.join("cam", r["file"].split("/")[-1]))
            overlay = Image.open(out / "overlays" / r["overlay"])
            assert overlay.size == (30, 20)
    renamed = [r for r in rows if r["file"] not in natural]
    assert len(renamed) == 1 and renamed[0]["path"] == str(tmp_path / "lotA/cam/part1.png")
    assert renamed[0]["overlay"].lower() not in natural


def test_collect_inputs_never_gives_a_real_input_s_name_to_another(tmp_path):
    for rel in ("a/x.png", "b/x.png", "b/x_2.png", "b/X_3.png"):
        _save(tmp_path / rel, (5, 5, 5))
    files, failed = result_files.collect_inputs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert failed == []
    keys = dict(files)
    assert keys[str(tmp_path / "a" / "x.png")] == "x.png"
    assert keys[str(tmp_path / "b" / "x_2.png")] == "x_2.png"
    assert keys[str(tmp_path / "b" / "X_3.png")] == "X_3.png"
    assert keys[str(tmp_path / "b" / "x.png")] == "x_4.png"  # not x_2 nor (any case) x_3


def test_a_used_out_folder_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    _save(tmp_path / "in" / "a.png", (200, 200, 200))
    out = tmp_path / "out"
    assert _cli([f"--out={out}", tmp_path / "in"], _scorer(), monkeypatch, capsys)[0] == 0
    before = (out / "scores.csv").read_bytes()
    _save(tmp_path / "in2" / "b.png", (20, 20, 20))
    rc, _, stderr = _cli([f"--out={out}", tmp_path / "in2"], _scorer(), monkeypatch, capsys)
    assert rc == 2
    assert f"--out={out} is not empty" in stderr and "--overwrite" in stderr
    assert (out / "scores.csv").read_bytes() == before  # untouched
    args = [f"--out={out}", "--overwrite", tmp_path / "in2"]
    assert _cli(args, _scorer(), monkeypatch, capsys)[0] == 0
    assert [r["file"] for r in _rows(out)] == ["b.png"]
    assert os.listdir(out / "overlays") == ["b.png"]


# --------------------------------------------------------------------------------------------
# Item 12 (predict's half): CSV cells a spreadsheet would run are written as text.
# --------------------------------------------------------------------------------------------


def test_formula_like_cells_are_written_as_text(tmp_path, monkeypatch, capsys):
    names = ["=cmd.png", "+sum.png", "-x.png", "@at.png", "\tt.png", "plain.png"]
    for name in names:
        _save(tmp_path / "in" / name, (100, 100, 100))
    monkeypatch.chdir(tmp_path / "in")  # the paths as given: relative, starting with '='
    out = tmp_path / "out"
    rc, _, stderr = _cli([f"--out={out}", "--", *names], _scorer(), monkeypatch, capsys)
    assert rc == 0, stderr
    rows = {r["file"]: r for r in _rows(out)}
    for name in names[:-1]:
        r = rows["'" + name]
        assert r["path"] == "'" + name and r["overlay"] == "'" + name
    assert rows["plain.png"]["path"] == "plain.png"
    with np.load(out / "maps.npz") as maps:  # the files' own names everywhere else
        assert sorted(maps.files) == sorted(names)
    assert sorted(os.listdir(out / "overlays")) == sorted(names)


# --------------------------------------------------------------------------------------------
# Item 10 (predict's half): formats outside the training ones only with --allow_formats.
# --------------------------------------------------------------------------------------------


def test_other_formats_need_allow_formats(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    _save(folder / "a.png", (200, 200, 200))
    webp = _save(folder / "b.webp", (20, 40, 60), fmt="WEBP")
    disguised = _save(folder / "c.png", (20, 40, 60), fmt="WEBP")
    out = tmp_path / "out"
    rc, _, stderr = _cli([f"--out={out}", folder, webp], _scorer(), monkeypatch, capsys)
    assert rc == 1
    for path in (webp, disguised):
        line = next(x for x in stderr.splitlines() if str(path) in x)
        assert "WEBP" in line and "--allow_formats" in line, line
    assert [r["file"] for r in _rows(out)] == ["a.png"]  # a folder's .webp is not even listed

    out = tmp_path / "out2"
    argv = [f"--out={out}", "--allow_formats=webp", folder]
    rc, _, stderr = _cli(argv, _scorer(), monkeypatch, capsys)
    assert rc == 0, stderr
    rows = {r["file"]: r for r in _rows(out)}
    assert sorted(rows) == ["a.png", "b.webp", "c.png"]
    assert float(rows["b.webp"]["score"]) == pytest.approx(_score_of((20, 40, 60)), abs=0.02)

    argv = [f"--out={tmp_path / 'o3'}", "--allow_formats=FOO", folder]
    rc, _, stderr = _cli(argv, _scorer(), monkeypatch, capsys)
    assert rc == 2 and "--allow_formats: unknown image format 'FOO'" in stderr


# --------------------------------------------------------------------------------------------
# Item 4 (predict's half): an unknown kind of part is written as such.
# --------------------------------------------------------------------------------------------


def test_an_unknown_class_is_written_without_a_decision(tmp_path, monkeypatch, capsys):
    """Two classes: dark parts (pooled near 0.1) and bright parts (near 0.9), radius 0.1 each
    (pooled features are the mean colour / 255 here)."""
    meta = {
        "categories": ["dark", "bright"],
        "threshold": {
            "image_score": THRESHOLD,
            "quantile": 0.99,
            "per_category": {"dark": 0.05, "bright": 0.95},
        },
        "class_centres": {
            "names": ["dark", "bright"],
            "centres": [[0.1] * 3, [0.9] * 3],
            "radii": [0.1, 0.1],
        },
    }
    folder = tmp_path / "in"
    _save(folder / "dark.png", (30, 30, 30))
    _save(folder / "bright.png", (225, 225, 225))
    _save(folder / "odd.png", (128, 0, 255))  # 0.5, 0.0, 1.0: far from both
    out = tmp_path / "out"
    rc, stdout, stderr = _cli([f"--out={out}", folder], _scorer(meta), monkeypatch, capsys)
    assert rc == 0, stderr
    rows = {r["file"]: r for r in _rows(out)}
    assert (rows["dark.png"]["category"], rows["dark.png"]["decision"]) == ("dark", "anomalous")
    assert (rows["bright.png"]["category"], rows["bright.png"]["decision"]) == (
        "bright",
        "normal",
    )
    odd = rows["odd.png"]
    assert (odd["category"], odd["decision"], odd["threshold"]) == ("", "unknown class", "")
    assert float(odd["score"]) == pytest.approx(_score_of((128, 0, 255)), rel=1e-6)
    assert "1 of an unknown class" in (out / "README.txt").read_text()
    assert "1 of an unknown class" in stdout


def test_readme_explains_the_columns(tmp_path, monkeypatch, capsys):
    _save(tmp_path / "in" / "a.png", (200, 200, 200))
    out = tmp_path / "out"
    assert _cli([f"--out={out}", tmp_path / "in"], _scorer(), monkeypatch, capsys)[0] == 0
    readme = (out / "README.txt").read_text()
    assert "path" in readme and "unknown class" in readme and "single quote" in readme
    header = io.StringIO((out / "scores.csv").read_text()).readline().strip()
    assert header == ",".join(result_files.CSV_COLUMNS)
    assert result_files.CSV_COLUMNS[:2] == ["file", "path"]
