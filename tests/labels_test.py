"""Labels without masks, mixed with masks in one category: which label each test image gets,
which files are named as disagreeing with their folder, how many have no mask, and pixel metrics
computed on the masked images only (against scikit-learn and a brute-force AUPRO on exactly those
pixels).

The end-to-end test builds a real MVTec-layout folder (the TFDS builder, the input pipeline at a
non-square evaluation size) and scores it with a fake predict function (the map is the image's red
channel), so the ground truth and the maps are known without training a model.
"""

import json
import math
import pathlib

import numpy as np
import pytest
from grad_jax.configs import tiny
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from grad_jax.data import input_pipeline
from grad_jax.evaluation import evaluate

NATIVE = (64, 96)  # (height, width) of the files
EVAL = (32, 48)  # the evaluation size: half of it, non-square
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max")


# ------------------------------------------------------------------ independent references


def f1_max_ref(labels, scores) -> float:
    """Best F1 over every threshold 'score >= t' (t over the distinct scores)."""
    labels, scores = np.asarray(labels).ravel() != 0, np.asarray(scores).ravel()
    best = 0.0
    for t in np.unique(scores):
        hit = scores >= t
        tp = np.count_nonzero(hit & labels)
        if tp:
            precision, recall = tp / np.count_nonzero(hit), tp / np.count_nonzero(labels)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def aupro_ref(masks, maps, limit=0.3) -> float:
    """MVTec AD's AUPRO by brute force: one curve point per distinct map value (pixels >= t),
    regions the 8-connected components of each image, trapezoids up to FPR `limit` (the value
    there interpolated), divided by `limit`."""
    regions = []
    for mask, m in zip(masks, maps, strict=True):
        ids, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [m[ids == k] for k in range(1, n + 1)]
    normal = np.concatenate([m[mask == 0] for mask, m in zip(masks, maps, strict=True)])
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for i in range(len(xs) - 1):
        x0, y0, x1, y1 = xs[i], ys[i], xs[i + 1], ys[i + 1]
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_the_references_on_hand_cases():
    """The references themselves: a perfect map, a constant map, and a map that ranks the
    region's two pixels below and above the normal ones."""
    mask = np.zeros((1, 2, 3), np.uint8)
    mask[0, 0, :2] = 1
    perfect = mask.astype(float)
    assert aupro_ref(mask, perfect) == pytest.approx(1.0)
    assert aupro_ref(mask, np.zeros_like(perfect)) == pytest.approx(0.15)  # limit / 2
    split = np.array([[[0.9, 0.1, 0.5], [0.4, 0.3, 0.2]]])
    # t=0.9: fpr 0, pro 0.5; t=0.5: fpr 1/4, pro 0.5; t=0.4: fpr 2/4 (cut at 0.3: pro 0.5)
    assert aupro_ref(mask, split) == pytest.approx(0.5)
    assert f1_max_ref([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == pytest.approx(0.8)


# ------------------------------------------------------------------ pure functions


def test_image_labels_follow_the_mask_where_known_else_the_folder():
    masks = np.zeros((5, 2, 2), np.uint8)
    masks[1, 0, 1] = 1  # masked defect
    masks[3, 1, 1] = 1  # a "good" image whose mask is not empty
    has_mask = np.array([True, True, True, True, False])
    folder = np.array([0, 1, 1, 0, 1])
    # 2: defect folder, empty mask -> 0 (the mask wins); 4: unmasked defect -> the folder's 1
    got = evaluate.image_labels(masks, has_mask, folder)
    assert got.tolist() == [0, 1, 0, 1, 1] and got.dtype == np.int32
    # An unknown mask never decides, even when (wrongly) non-empty: the folder does.
    masks[4, 0, 0] = 1
    folder[4] = 0
    assert evaluate.image_labels(masks, has_mask, folder).tolist() == [0, 1, 0, 1, 0]


def _category(name, folder, labels, has_mask, n_pixels=4):
    n = len(folder)
    return evaluate.CategoryEval(
        np.linspace(0.0, 1.0, n),
        np.asarray(labels, np.int32),
        np.zeros((n, 2, n_pixels // 2), np.float32),
        np.zeros((n, 2, n_pixels // 2), np.uint8),
        np.asarray(has_mask, bool),
        name=name,
        filenames=[f"{name}/{i:02d}.png" for i in range(n)],
        folder_labels=np.asarray(folder, np.int32),
    )


def test_disagreements_are_masked_images_only_both_ways_in_file_order():
    # 0 good agrees, 1 good with a mask (label 1) disagrees, 2 masked defect agrees, 3 masked
    # defect with an empty mask disagrees, 4 unmasked defect (label from the folder) and 5 an
    # unmasked image whose stored label differs from its folder: never a disagreement (unknown).
    r = _category(
        "part",
        folder=[0, 0, 1, 1, 1, 1],
        labels=[0, 1, 1, 0, 1, 0],
        has_mask=[True, True, True, True, False, False],
    )
    assert r.label_disagreements() == ["part/01.png", "part/03.png"]
    report = evaluate.label_report([r])
    assert report == {
        "label_disagreements": {"part": {"count": 2, "files": ["part/01.png", "part/03.png"]}},
        "images_without_mask": {"part": 2},
    }


def test_label_report_names_only_the_categories_concerned():
    clean = _category("clean", [0, 1], [0, 1], [True, True])
    unmasked = _category("unmasked", [0, 1, 1], [0, 1, 1], [True, False, False])
    masked_only = _category("odd", [1, 1, 0], [0, 1, 0], [True, True, True])
    report = evaluate.label_report([clean, unmasked, masked_only])
    assert report == {
        "label_disagreements": {"odd": {"count": 1, "files": ["odd/00.png"]}},
        "images_without_mask": {"unmasked": 2},
    }
    assert evaluate.label_report([clean]) == {}


def test_disagreement_note_counts_all_and_names_the_first_ten():
    n = 12
    r = _category("many", [1] * n + [0], [0] * n + [0], [True] * (n + 1))
    r.masks[0, 0, 0] = 1  # one image with a positive pixel keeps pixel metrics defined
    r.labels[0] = 1
    _, notes = evaluate.compute_metrics([r])
    (note,) = [x for x in notes if x.startswith("many: 11 image(s)")]
    named = [f"many/{i:02d}.png" for i in range(1, 12)]
    assert all(f in note for f in named[:10]) and named[10] not in note
    assert note.endswith(" ...")
    assert len(r.label_disagreements()) == 11


# ------------------------------------------------------------------ end to end


def _save(array, path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _image(rng, red):
    """An RGB image whose red channel is `red` (the fake model's map), the rest noise."""
    h, w = red.shape
    other = rng.integers(60, 200, (h, w, 2))
    return np.concatenate([red[..., None], other], -1)


def build_mixed(base: pathlib.Path):
    """Two categories. 'part': good images; 'crack' with masks (one mask of a single pixel that
    the nearest-neighbour resize to EVAL drops); 'stain' without masks, whose red band would be
    a flood of false positives if its pixels were counted as normal; 'hole' with masks (two
    regions). 'bare': good images and a defect folder without masks only.

    Returns {category: {relative test path: (folder label, native mask or None)}}.
    """
    rng = np.random.default_rng(3)
    h, w = NATIVE
    truth = {"part": {}, "bare": {}}

    def background():
        return rng.integers(0, 140, (h, w))

    for category in truth:
        for i in range(2):
            _save(_image(rng, background()), base / category / "train" / "good" / f"{i:03d}.png")
        for i in range(2):
            rel = f"test/good/{i:03d}.png"
            _save(_image(rng, background()), base / category / rel)
            truth[category][rel] = (0, np.zeros(NATIVE, np.uint8))

    def defect(category, folder, i, mask, red, with_mask):
        rel = f"test/{folder}/{i:03d}.png"
        _save(_image(rng, red), base / category / rel)
        if with_mask:
            _save(mask * 255, base / category / "ground_truth" / folder / f"{i:03d}_mask.png")
        truth[category][rel] = (1, mask if with_mask else None)

    crack = np.zeros(NATIVE, np.uint8)
    crack[10:30, 20:50] = 1
    red = background()
    red[crack == 1] = rng.integers(100, 256, int(crack.sum()))
    defect("part", "crack", 0, crack, red, True)
    speck = np.zeros(NATIVE, np.uint8)
    speck[0, 0] = 1  # empty at EVAL (Pillow's nearest never samples pixel (0, 0) at 1/2)
    defect("part", "crack", 1, speck, background(), True)
    for i in range(2):
        red = background()
        red[: h // 2] = 255
        defect("part", "stain", i, np.zeros(NATIVE, np.uint8), red, False)
    hole = np.zeros(NATIVE, np.uint8)
    hole[40:50, 10:20] = 1
    hole[44:60, 70:90] = 1
    red = background()
    red[hole == 1] = rng.integers(90, 256, int(hole.sum()))
    defect("part", "hole", 0, hole, red, True)
    for i in range(2):
        red = background()
        red[20:40, 30:60] = 250
        defect("bare", "dent", i, np.zeros(NATIVE, np.uint8), red, False)
    return truth


def _fake_predict(images):
    """The 'model': the map is the red channel in [0, 1] (the raw map, also as GRAD's kind;
    smoothing is off in the config); the score its mean plus its maximum; the pooled feature the
    mean colour."""
    maps = np.asarray(images, np.float32)[..., 0] / 255.0
    return {
        "raw": maps,
        "raw_grad": maps,
        "smoothed": maps,
        "score": maps.mean(axis=(1, 2)) + maps.max(axis=(1, 2)),
        "pooled": np.asarray(images, np.float32).mean(axis=(1, 2)),
    }


def _resized_mask(mask):
    return np.asarray(Image.fromarray(mask * 255).resize(EVAL[::-1], Image.NEAREST)) > 0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    base = tmp_path_factory.mktemp("mixed")
    truth = build_mixed(base / "data")
    config = tiny.get_config()
    config.data.root = str(base / "data")
    config.data.data_dir = str(base / "tfds")
    config.data.image_size = EVAL
    config.eval.batch_size = 3  # several batches per category, the last one short
    config.eval.smooth_size = 1  # the maps are the red channel itself
    categories = input_pipeline.open_categories(config)
    results = evaluate.evaluate_categories(_fake_predict, categories, config)
    return base, truth, {r.name: r for r in results}


def test_labels_masks_and_disagreements_of_a_mixed_category(mixed):
    _, truth, results = mixed
    r = results["part"]
    assert r.masks.shape == (7, *EVAL) and r.maps.shape == (7, *EVAL)
    rows = {f.removeprefix("part/"): k for k, f in enumerate(r.filenames)}
    assert set(rows) == set(truth["part"])
    for rel, (folder, mask) in truth["part"].items():
        k = rows[rel]
        assert r.folder_labels[k] == folder, rel
        assert bool(r.has_mask[k]) == (mask is not None), rel
        if mask is None:  # unknown: labelled by its folder, its stored mask all zero
            assert r.labels[k] == folder and not r.masks[k].any(), rel
        else:
            want = _resized_mask(mask)
            np.testing.assert_array_equal(r.masks[k] != 0, want, err_msg=rel)
            assert r.labels[k] == int(want.any()), rel
    assert r.labels[rows["test/crack/001.png"]] == 0  # the speck vanished at EVAL
    assert r.label_disagreements() == ["part/test/crack/001.png"]
    assert results["bare"].label_disagreements() == []


def test_metrics_json_of_a_mixed_category(mixed, capsys):
    base, truth, results = mixed
    workdir = base / "run"
    workdir.mkdir()
    values = evaluate.publish(str(workdir), list(results.values()), {"model": "fake"})
    saved = json.loads((workdir / "metrics.json").read_text())
    assert saved["label_disagreements"] == {
        "part": {"count": 1, "files": ["part/test/crack/001.png"]}
    }
    assert saved["images_without_mask"] == {"part": 2, "bare": 2}

    # Image metrics: every image, with its label (mask where known, else folder).
    for name, r in results.items():
        want = roc_auc_score(r.labels, r.scores)
        assert values[f"{name}/image_auroc"] == pytest.approx(want, abs=1e-9)
        assert saved[f"{name}/image_auroc"] == pytest.approx(want, abs=1e-9)
    r = results["part"]
    rows = {f.removeprefix("part/"): k for k, f in enumerate(r.filenames)}
    want_labels = [0, 0, 1, 0, 1, 1, 1]  # good x2, crack 000/001, hole, stain x2
    order = ["test/good/000.png", "test/good/001.png", "test/crack/000.png"]
    order += ["test/crack/001.png", "test/hole/000.png", "test/stain/000.png", "test/stain/001.png"]
    assert [int(r.labels[rows[f]]) for f in order] == want_labels

    # Pixel metrics: on exactly the masked images' pixels (good, crack, hole), masks from the
    # files resized here.
    masked = [rel for rel, (_, m) in truth["part"].items() if m is not None]
    gt = np.stack([_resized_mask(truth["part"][rel][1]) for rel in masked]).astype(np.uint8)
    maps = np.stack([r.maps[rows[rel]] for rel in masked])
    want = {
        "pixel_auroc": roc_auc_score(gt.ravel(), maps.ravel()),
        "pixel_ap": average_precision_score(gt.ravel(), maps.ravel()),
        "pixel_f1_max": f1_max_ref(gt, maps),
        "pixel_aupro": aupro_ref(gt, maps),
    }
    # The case discriminates: with the unmasked stains' pixels counted as normal, every pixel
    # figure would be far lower.
    everything = np.stack([r.maps[rows[rel]] for rel in truth["part"]])
    gt_all = np.stack([r.masks[rows[rel]] for rel in truth["part"]])
    assert roc_auc_score(gt_all.ravel(), everything.ravel()) < want["pixel_auroc"] - 0.05
    assert aupro_ref(gt_all, everything) < want["pixel_aupro"] - 0.05
    for key, value in want.items():
        assert values[f"part/{key}"] == pytest.approx(value, abs=1e-9), key
        assert saved[f"part/{key}"] == pytest.approx(value, abs=1e-9), key
        # 'bare' has no masked defect: n/a, and the mean is 'part' alone
        assert math.isnan(values[f"bare/{key}"]) and saved[f"bare/{key}"] == "n/a", key
        assert saved[f"mean/{key}"] == pytest.approx(value, abs=1e-9), key
    notes = "\n".join(saved["notes"])
    assert "part: 2 defective test image(s) have no mask" in notes
    assert "use the other 5 image(s)" in notes
    assert "bare/pixel_auroc is nan, reported as n/a (no defective test image has a mask)" in notes
    assert "part: 1 image(s) of a defect folder" in notes and "crack/001.png" in notes
    table = capsys.readouterr().out
    cells = next(line for line in table.splitlines() if line.startswith("bare ")).split()
    # category, I-AUROC, P-AUROC, P-AUPRO, I-AP, P-AP, I-F1max, P-F1max
    assert [cells[i] for i in (2, 3, 5, 7)] == ["n/a"] * 4
    assert "n/a" not in (cells[1], cells[4], cells[6])
