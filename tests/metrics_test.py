"""Tests for grad_jax.evaluation.metrics against scikit-learn and brute-force references."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from grad_jax.evaluation import metrics

# --------------------------------------------------------------------------------------------
# Helpers: independent, slow reference implementations.
# --------------------------------------------------------------------------------------------


def _random_binary_problem(rng, n, ties):
    labels = rng.integers(0, 2, n)
    if ties:
        scores = rng.integers(0, 7, n).astype(np.float32) + 0.5 * labels
    else:
        scores = rng.normal(size=n) + labels
    return labels, scores


def _brute_f1(labels, scores):
    """Best F1 over every distinct threshold, highest threshold first (ties keep the first)."""
    best, best_thr = -1.0, None
    for thr in sorted(set(np.ravel(scores).tolist()), reverse=True):
        pred = np.ravel(scores) >= thr
        truth = np.ravel(labels) == 1
        tp = np.sum(pred & truth)
        fp = np.sum(pred & ~truth)
        fn = np.sum(~pred & truth)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best:
            best, best_thr = f1, thr
    return best, best_thr


def _brute_pro_points(masks, maps, keep=None):
    """(fpr, pro) with the (0, 0) start, one point per distinct map value, labelling per image.

    With `keep` (bool, the shape of `masks`) only those pixels count: regions are still the
    components of the whole mask, and a region without a kept pixel is left out."""
    keep = np.ones(masks.shape, bool) if keep is None else keep
    normal = (masks == 0) & keep
    fprs, pros = [0.0], [0.0]
    for thr in sorted(set(maps[keep].tolist()), reverse=True):
        above = (maps >= thr) & keep
        overlaps = []
        for i, mask in enumerate(masks):
            labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
            for r in range(1, n + 1):
                region = (labelled == r) & keep[i]
                if region.any():
                    overlaps.append(np.sum(above[i] & region) / np.sum(region))
        pros.append(float(np.mean(overlaps)))
        fprs.append(float(np.sum(above & normal) / np.sum(normal)))
    return np.array(fprs), np.array(pros)


def _reference_sample(masks, max_pixels, seed):
    """The plot's sampling rule, written out: a float32 uniform draw per pixel (C order) from
    `default_rng(seed)`; every anomalous pixel is kept if they fit in half the budget, else
    each with probability (budget // 2) / n_anomalous; normal pixels fill the rest."""
    anomalous = masks != 0
    n_anomalous = int(anomalous.sum())
    n_normal = anomalous.size - n_anomalous
    keep_anomalous = min(n_anomalous, max_pixels // 2)
    keep_normal = min(n_normal, max_pixels - keep_anomalous)
    draw = np.random.default_rng(seed).random(masks.size, dtype=np.float32)
    draw = draw.astype(np.float64).reshape(masks.shape)
    return np.where(anomalous, draw < keep_anomalous / n_anomalous, draw < keep_normal / n_normal)


def _brute_aupro(masks, maps, limit):
    fprs, pros = _brute_pro_points(masks, maps)
    area = 0.0
    for i in range(len(fprs) - 1):
        f0, p0, f1, p1 = fprs[i], pros[i], fprs[i + 1], pros[i + 1]
        if f1 <= limit:
            area += (f1 - f0) * (p0 + p1) / 2
        elif f0 < limit:
            p_lim = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
            area += (limit - f0) * (p0 + p_lim) / 2
    return area / limit


def _random_masks_and_maps(rng, n=4, size=10, levels=None):
    masks = (rng.random((n, size, size)) < 0.15).astype(np.uint8)
    masks[0] = 0  # a fully normal image
    masks[1, 2:5, 2:5] = 1  # a guaranteed multi-pixel region
    masks[2, 2:5, 2:5] = 1  # same place in the next image: must stay a separate region
    maps = rng.random((n, size, size)) + 0.4 * masks
    if levels is not None:  # quantise to create many ties, across and within classes
        maps = np.floor(maps * levels) / levels
    return masks, maps.astype(np.float32)


# --------------------------------------------------------------------------------------------
# AUROC / AP / F1 / ROC curve.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    labels, scores = _random_binary_problem(rng, 2000, ties)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize(
    "scores",
    [
        np.array([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 0.0, 1.0], np.float32),  # both zeros must tie
        np.array([0, 0, 1, -1, 3, -3, 0, 1], np.int64),  # argsort fallback path
        np.array([0.1, 0.2, 0.1, 0.3, 1e-300, 0.2, 0.1, -1e300], np.float64),  # not float32-exact
        np.array([True, False, True, True, False, False, True, True]),
    ],
)
def test_auroc_and_ap_every_score_dtype(scores):
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_auroc_hand_cases_and_no_flip():
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert metrics.auroc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0  # not mirrored to 1.0
    assert metrics.auroc(labels, np.array([0.3, 0.4, 0.1, 0.35])) == 0.25  # not mirrored to 0.75
    assert metrics.auroc(labels, np.full(4, 7.0)) == 0.5
    assert metrics.auroc(labels, np.array([0.1, 0.2, 0.2, 0.4])) == 0.875  # one tied pair: 3.5/4
    assert math.isnan(metrics.auroc(np.ones(4), np.arange(4.0)))
    assert math.isnan(metrics.auroc(np.zeros(4), np.arange(4.0)))


def test_average_precision_hand_cases():
    labels = np.array([0, 0, 1, 1])
    assert metrics.average_precision(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    # Ranking: pos (P=1), neg, pos (P=2/3), neg -> (1 + 2/3) / 2.
    assert metrics.average_precision(labels, np.array([0.3, 0.1, 0.2, 0.4])) == pytest.approx(5 / 6)
    assert metrics.average_precision(labels, np.full(4, 1.0)) == 0.5  # one threshold, P = 1/2
    assert math.isnan(metrics.average_precision(np.zeros(4), np.arange(4.0)))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    labels, scores = _random_binary_problem(rng, 300, ties)
    f1, thr = metrics.f1_max(labels, scores)
    ref_f1, ref_thr = _brute_f1(labels, scores)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert thr == ref_thr


def test_f1_max_hand_case():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.2])
    # thr 0.9: P=1,R=1/3 -> 0.5; thr 0.5: TP=2,FP=1 -> 4/6; thr 0.2: TP=3,FP=1 -> 6/7.
    assert metrics.f1_max(labels, scores) == (pytest.approx(6 / 7), 0.2)
    assert all(math.isnan(v) for v in metrics.f1_max(np.zeros(3), np.arange(3.0)))


def test_roc_curve_end_points_monotonic_and_area():
    rng = np.random.default_rng(3)
    labels, scores = _random_binary_problem(rng, 500, ties=True)
    fpr, tpr = metrics.roc_curve(labels, scores)
    assert fpr.shape == tpr.shape == (np.unique(scores).size + 1,)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(metrics.auroc(labels, scores), abs=1e-12)


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.array([0, 1]), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="0 and 1"):
        metrics.auroc(np.array([0, 255]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="elements"):
        metrics.auroc(np.array([0, 1, 1]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


# --------------------------------------------------------------------------------------------
# PRO curve / AUPRO.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("levels", [None, 6, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_brute_force(seed, levels, limit):
    rng = np.random.default_rng(seed)
    masks, maps = _random_masks_and_maps(rng, levels=levels)
    expected = _brute_aupro(masks, maps, limit)
    assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 5])
def test_pro_curve_matches_brute_force_and_is_monotonic(levels):
    rng = np.random.default_rng(7)
    masks, maps = _random_masks_and_maps(rng, levels=levels)
    fpr, pro = metrics.pro_curve(masks, maps)
    ref_fpr, ref_pro = _brute_pro_points(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("max_pixels", [100, 300])
def test_sampled_pro_curve_is_the_brute_force_curve_of_the_sample(max_pixels, levels):
    rng = np.random.default_rng(11)
    masks, maps = _random_masks_and_maps(rng, levels=levels)
    n_anomalous = int(masks.sum())
    # one budget keeps every anomalous pixel, the other samples them
    assert (n_anomalous <= max_pixels // 2) == (max_pixels == 300)
    assert metrics.pro_curve_is_sampled(masks.size, max_pixels)
    keep = _reference_sample(masks, max_pixels, seed=3)
    if max_pixels == 300:
        assert keep[masks != 0].all()
    fpr, pro = metrics.pro_curve(masks, maps, max_pixels=max_pixels, seed=3)
    ref_fpr, ref_pro = _brute_pro_points(masks, maps, keep)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    other_fpr, _ = metrics.pro_curve(masks, maps, max_pixels=max_pixels, seed=4)
    assert not np.array_equal(other_fpr, fpr)  # the seed picks the sample


def test_pro_curve_for_plots_is_exact_within_the_budget_and_close_beyond():
    rng = np.random.default_rng(7)
    masks = np.zeros((6, 40, 40), np.uint8)
    masks[0, 5:9, 5:9] = 1
    masks[0, 20:30, 22:35] = 1
    masks[3, 10:12, 30:31] = 1
    maps = rng.random((6, 40, 40)).astype(np.float32) + 0.4 * masks
    maps[2] = np.round(maps[2], 1)  # ties
    want_fpr, want_pro = metrics.pro_curve(masks, maps)
    ref_fpr, ref_pro = _brute_pro_points(masks, maps)
    np.testing.assert_allclose(want_fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(want_pro, ref_pro, atol=1e-12)
    assert not metrics.pro_curve_is_sampled(masks.size, masks.size)
    fpr, pro = metrics.pro_curve(masks, maps, max_pixels=masks.size)
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(pro, want_pro)
    # subsampled: an estimate of the same curve
    assert metrics.pro_curve_is_sampled(masks.size, 3000)
    fpr, pro = metrics.pro_curve(masks, maps, max_pixels=3000, seed=1)
    assert fpr.size < want_fpr.size
    grid = np.linspace(0, 0.3, 301)
    estimate, exact = np.interp(grid, fpr, pro), np.interp(grid, want_fpr, want_pro)
    assert np.abs(estimate.mean() - exact.mean()) < 0.02  # ~ the normalised AUPRO
    assert np.abs(estimate - exact).max() < 0.06
    fpr, pro = metrics.pro_curve(np.zeros_like(masks), maps, max_pixels=3000)
    assert np.isnan(fpr).all() and np.isnan(pro).all()


def test_aupro_hand_cases():
    rng = np.random.default_rng(0)
    masks, _ = _random_masks_and_maps(rng)
    perfect = masks * 2.0 + rng.random(masks.shape)  # every anomalous pixel above every normal
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(masks, -perfect) == 0.0
    # A constant map is a single threshold: the curve is the diagonal, area 0.3^2/2 over 0.3.
    assert metrics.aupro(masks, np.ones(masks.shape)) == pytest.approx(0.15, abs=1e-12)
    # One region of 2 pixels: (0,0) -> (0,.5) -> (.5,.5) -> (.5,1) -> (1,1).
    mask = np.array([[[1, 1, 0, 0]]])
    amap = np.array([[[3.0, 1.0, 2.0, 0.0]]])
    assert metrics.aupro(mask, amap) == pytest.approx(0.5)
    assert metrics.aupro(mask, amap, fpr_limit=1.0) == pytest.approx(0.75)
    assert math.isnan(metrics.aupro(np.zeros((2, 3, 3)), np.ones((2, 3, 3))))
    assert math.isnan(metrics.aupro(np.ones((2, 3, 3)), np.ones((2, 3, 3))))


def test_pro_regions_are_8_connected_within_an_image_only():
    # Diagonal neighbours form one region (8-connectivity): {(0,0), (1,1)} and {(3,3)}.
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = 1
    amap = np.zeros((1, 4, 4))
    amap[0, 0, 0], amap[0, 3, 3], amap[0, 1, 1] = 5.0, 4.0, 1.0
    _, pro = metrics.pro_curve(mask, amap)
    np.testing.assert_allclose(pro, [0.0, 0.25, 0.75, 1.0, 1.0])  # 4-connectivity: 1/3 first
    # The same pixel position in two images is two regions (sizes 1 and 2, not one of size 3).
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 0, 0], maps[1, 0, 0], maps[1, 0, 1] = 1.0, 0.5, 0.5
    _, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# evaluate_category / evaluate / format_table.
# --------------------------------------------------------------------------------------------


def _category(rng, n_images, flip_images=False):
    masks = np.zeros((n_images, 12, 12), np.uint8)
    for i in range(0, n_images, 2):
        y, x = rng.integers(0, 8, 2)
        masks[i, y : y + 3, x : x + 4] = 1
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    labels = masks.reshape(n_images, -1).any(axis=1).astype(np.int64)
    scores = maps.reshape(n_images, -1).max(axis=1)
    if flip_images:
        scores = -scores
    return metrics.CategoryResults(scores=scores, labels=labels, maps=maps, masks=masks)


def test_evaluate_category_matches_standalone_metrics():
    res = _category(np.random.default_rng(0), 10)
    out = metrics.evaluate_category(res.scores, res.labels, res.maps, res.masks)
    assert list(out) == list(metrics.METRIC_KEYS)
    assert out["image_auroc"] == metrics.auroc(res.labels, res.scores)
    assert out["pixel_auroc"] == metrics.auroc(res.masks, res.maps)
    assert out["pixel_aupro"] == metrics.aupro(res.masks, res.maps, fpr_limit=0.3)
    assert out["image_ap"] == metrics.average_precision(res.labels, res.scores)
    assert out["pixel_ap"] == metrics.average_precision(res.masks, res.maps)
    assert (out["image_f1_max"], out["image_f1_threshold"]) == metrics.f1_max(
        res.labels, res.scores
    )
    assert (out["pixel_f1_max"], out["pixel_f1_threshold"]) == metrics.f1_max(res.masks, res.maps)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(res.masks.ravel(), res.maps.ravel()))


def test_evaluate_unweighted_mean_notes_and_no_flip():
    rng = np.random.default_rng(1)
    good = _category(rng, 4)  # image AUROC 1.0 (anomalous maps are shifted by +1)
    bad = _category(rng, 20, flip_images=True)  # image AUROC 0.0, five times as many images
    normal_only = _category(rng, 3)
    normal_only.masks[:] = 0
    normal_only.labels[:] = 0
    results = {"good": good, "bad": bad, "empty": normal_only}
    out, notes = metrics.summarise(results)

    for name in results:
        for key in metrics.METRIC_KEYS:
            assert f"{name}/{key}" in out
    assert out["good/image_auroc"] == 1.0
    assert out["bad/image_auroc"] == 0.0  # not flipped
    assert math.isnan(out["empty/image_auroc"])
    # Unweighted over the two defined categories (a pooled / size-weighted mean would differ).
    assert out["mean/image_auroc"] == 0.5
    for key in ("pixel_auroc", "pixel_aupro", "image_ap", "pixel_ap", "pixel_f1_max"):
        assert out[f"mean/{key}"] == pytest.approx((out[f"good/{key}"] + out[f"bad/{key}"]) / 2)
    assert "mean/image_f1_threshold" not in out and "mean/pixel_f1_threshold" not in out

    flip_notes = [n for n in notes if n.startswith("bad/image_auroc")]
    assert flip_notes == [
        "bad/image_auroc = 0.0000 < 0.5: the reference code would have reported "
        "1 - value = 1.0000 (flip not applied)"
    ]
    assert not any(n.startswith("good/") for n in notes)
    assert any(n.startswith("empty/image_auroc is nan") for n in notes)
    assert not any("disagree" in n for n in notes)

    bad.labels[1] = 1  # image 1 has an empty mask
    _, notes = metrics.summarise({"bad": bad})
    assert any(n.startswith("bad: 1 image label(s) disagree") for n in notes)
    with pytest.raises(ValueError, match="reserved"):
        metrics.summarise({"mean": good})


def test_format_table():
    rng = np.random.default_rng(2)
    out, _ = metrics.summarise({"bottle": _category(rng, 6), "cable": _category(rng, 6, True)})
    table = metrics.format_table(out)
    lines = table.splitlines()
    assert lines[0].split() == [
        "category",
        "I-AUROC",
        "P-AUROC",
        "P-AUPRO",
        "I-AP",
        "P-AP",
        "I-F1max",
        "P-F1max",
    ]
    assert [line.split()[0] for line in lines[2:]] == ["bottle", "cable", "mean"]
    assert lines[2].split()[1] == "100.0" and lines[3].split()[1] == "0.0"
    assert lines[4].split()[1] == "50.0"
    assert lines[2].split()[2] == f"{100 * out['bottle/pixel_auroc']:.1f}"
    assert len({len(line) for line in lines}) == 1  # aligned
