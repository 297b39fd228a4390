"""Data as users have it: test images labelled by folder only (no masks), partial masks,
a test split of good images only."""

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from grad_jax import predict
from grad_jax.evaluation import evaluate, metrics
from grad_jax.inference.predictor import Predictor
from grad_jax.training import loop
from tests.conftest import tiny_category

PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max")


def _tiny(root, data_dir, epochs=1, holdout=0.25):
    from grad_jax.configs import tiny

    config = tiny.get_config()
    config.data.dataset = "folder"
    config.data.root = str(root)
    config.data.data_dir = str(data_dir)
    config.train.epochs = epochs
    config.threshold.holdout_fraction = holdout
    return config


def _test_files(root):
    """(relative path, folder label) of every test image, sorted as the builder orders them."""
    out = []
    for defect in sorted(os.listdir(root / "test")):
        for name in sorted(os.listdir(root / "test" / defect)):
            out.append((f"test/{defect}/{name}", int(defect != "good")))
    return sorted(out)


@pytest.fixture(scope="module")
def labels_only(tmp_path_factory):
    """A generated category whose ground_truth/ folder is gone: image labels only."""
    base = tmp_path_factory.mktemp("labels_only")
    root = tiny_category(base, num_train=8, num_test_good=3, num_test_defect=1)
    shutil.rmtree(root / "ground_truth")
    workdir = base / "run"
    values = loop.train_and_evaluate(_tiny(root, base / "tfds"), str(workdir))
    return root, workdir, values


def test_labels_only_trains_evaluates_and_says_na(labels_only, capsys):
    root, workdir, values = labels_only
    saved = json.loads((workdir / "metrics.json").read_text())
    for key in PIXEL_KEYS:
        assert saved[f"hex_nut/{key}"] == "n/a" and saved[f"mean/{key}"] == "n/a"
        assert math.isnan(values[f"hex_nut/{key}"])
    files = _test_files(root)
    n_defective = sum(label for _, label in files)
    assert saved["images_without_mask"] == {"hex_nut": n_defective}
    assert "label_disagreements" not in saved
    assert any("no defective test image has a mask" in n for n in saved["notes"])

    # The image labels come from the folders: image AUROC equals sklearn's on the folder labels
    # and the scores of the saved model (empty masks would make every label 0: no AUROC).
    predictor = Predictor.from_workdir(workdir, batch_size=4)
    scored, failed = predictor.predict_files([root / f for f, _ in files])
    assert not failed
    scores = [p.score for _, p in scored]
    want = roc_auc_score([label for _, label in files], scores)
    assert saved["hex_nut/image_auroc"] == pytest.approx(want, abs=1e-6)

    # False alarms at the held-out threshold, over the good test images.
    threshold = saved["threshold"]["image_score"]
    good = [s for s, (_, label) in zip(scores, files, strict=True) if label == 0]
    assert saved["hex_nut/false_alarm_rate"] == pytest.approx(np.mean(np.array(good) >= threshold))

    table = metrics.format_table(values)
    assert "n/a" in table.splitlines()[2] and "FAR@thr" in table.splitlines()[0]
    index = (workdir / "report" / "index.html").read_text()
    assert "n/a" in index and "FAR@thr" in index

    # predict on the test folder writes its outputs
    out = workdir / "scored"
    assert (
        predict.main(["predict", f"--workdir={workdir}", f"--out={out}", str(root / "test")]) == 0
    )
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(files)


def _category_eval(rng, name="part"):
    """Six good, three masked defects (one with an empty mask), three unmasked defects."""
    n, size = 12, 16
    masks = np.zeros((n, size, size), np.uint8)
    maps = rng.random((n, size, size)).astype(np.float32)
    for i in (6, 7):  # masked defects with a region, mapped high there
        masks[i, 4:9, 5:10] = 1
        maps[i, 4:9, 5:10] += 0.8
    # 8: masked defect folder image with an empty mask -> label 0 by the reference's rule
    maps[9:, 10:14, 2:6] += 3.0  # unmasked defects: high map values where nothing is known
    has_mask = np.array([True] * 9 + [False] * 3)
    folder = np.array([0] * 6 + [1] * 6, np.int32)
    labels = evaluate.image_labels(masks, has_mask, folder)
    scores = maps.reshape(n, -1).max(axis=1)
    files = [f"{name}/test/{'good' if f == 0 else 'dent'}/{i}.png" for i, f in enumerate(folder)]
    return evaluate.CategoryEval(
        scores, labels, maps, masks, has_mask, name=name, filenames=files, folder_labels=folder
    )


def test_partial_masks_pixel_metrics_only_where_masks_exist():
    r = _category_eval(np.random.default_rng(0))
    assert r.labels.tolist() == [0] * 6 + [1, 1, 0] + [1, 1, 1]
    values, notes = evaluate.compute_metrics([r], threshold=1.0)
    known = r.has_mask
    want_pixel = roc_auc_score(r.masks[known].ravel(), r.maps[known].ravel())
    assert values["part/pixel_auroc"] == pytest.approx(want_pixel, abs=1e-9)
    assert values["part/image_auroc"] == pytest.approx(roc_auc_score(r.labels, r.scores))
    assert values["part/false_alarm_rate"] == pytest.approx(np.mean(r.scores[r.labels == 0] >= 1))
    assert r.label_disagreements() == ["part/test/dent/8.png"]
    report = evaluate.label_report([r])
    assert report["label_disagreements"] == {
        "part": {"count": 1, "files": ["part/test/dent/8.png"]}
    }
    assert report["images_without_mask"] == {"part": 3}
    assert any("3 defective test image(s) have no mask" in n for n in notes)
    assert any("part: 1 image(s)" in n and "dent/8.png" in n for n in notes)


def test_good_only_test_split_gives_false_alarm_rate(tmp_path):
    rng = np.random.default_rng(1)
    n = 10
    maps = rng.random((n, 8, 8)).astype(np.float32)
    scores = np.linspace(0.0, 0.9, n)
    r = evaluate.CategoryEval(
        scores,
        np.zeros(n, np.int32),
        maps,
        np.zeros((n, 8, 8), np.uint8),
        np.ones(n, bool),
        name="ok",
        filenames=[f"ok/test/good/{i}.png" for i in range(n)],
        folder_labels=np.zeros(n, np.int32),
    )
    values, notes = evaluate.compute_metrics([r], threshold=0.55)
    assert values["ok/false_alarm_rate"] == pytest.approx(0.4)  # 0.6, 0.7, 0.8, 0.9
    assert math.isnan(values["ok/image_auroc"]) and math.isnan(values["ok/pixel_auroc"])
    evaluate.write_metrics(str(tmp_path), values, notes)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["ok/image_auroc"] == "n/a" and saved["ok/false_alarm_rate"] == 0.4
    assert saved["mean/false_alarm_rate"] == 0.4
