"""Selection's synthetic validation (`selection.validation`): made from the held-out normal
training images (each as it is, and with synthetic defects whose patches come from the other
training images of its category), and the figures each model kind gets on it: the mean over
categories of image AUROC and of pixel AUPRO, checked against sklearn, a small AUPRO and the
smoothing, scores and 'grad+knn' standardisation written here."""

import numpy as np
import pytest
from grad_jax.configs import tiny
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from grad_jax.data import input_pipeline
from grad_jax.data import synthetic_defects as sd
from grad_jax.data.input_pipeline import Item
from grad_jax.errors import SelectionError
from grad_jax.selection import validation

# ---------------------------------------------------------------------------------------------
# The reference: the figure from scores, maps and masks
# ---------------------------------------------------------------------------------------------


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AD's AUPRO: regions are the 8-connected components of each image's mask; at every
    threshold t (each distinct map value, from the top), PRO is the mean over regions of the
    share of their pixels with map >= t and FPR the share of normal pixels with map >= t; the
    curve from (0, 0) is integrated (trapezoids) up to FPR = limit, interpolated there, and
    divided by limit."""
    ids = np.zeros(masks.shape, np.int64)
    n = 0
    for k, mask in enumerate(masks):
        labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        ids[k] = np.where(labels > 0, labels + n, 0)
        n += count
    ids, values = ids.ravel(), maps.ravel().astype(np.float64)
    sizes = np.bincount(ids, minlength=n + 1)
    weight = np.where(ids > 0, 1.0 / (n * sizes[ids]), 0.0)
    order = np.argsort(-values, kind="stable")
    v = values[order]
    fpr = np.cumsum(ids[order] == 0) / np.count_nonzero(ids == 0)
    pro = np.cumsum(weight[order])
    last = np.r_[v[1:] != v[:-1], True]  # the last pixel of each group of equal values
    xs, ys = [0.0, *fpr[last]], [0.0, *pro[last]]
    area = 0.0
    for k in range(len(xs) - 1):
        x0, y0, x1, y1 = xs[k], ys[k], xs[k + 1], ys[k + 1]
        if x1 > limit:
            area += (limit - x0) * (y0 + (y0 + (y1 - y0) * (limit - x0) / (x1 - x0))) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def reference_figures(per_category) -> dict[str, float]:
    """[(scores [N], maps [N, H, W], masks [N, H, W])] per category -> the means and figure."""
    image, pixel, pro = [], [], []
    for scores, maps, masks in per_category:
        labels = masks.reshape(len(masks), -1).any(axis=1)
        image.append(roc_auc_score(labels, scores))
        pixel.append(roc_auc_score(masks.ravel() > 0, maps.ravel()))
        pro.append(reference_aupro(masks, maps))
    out = {"image_auroc": np.mean(image), "pixel_auroc": np.mean(pixel)}
    out["pixel_aupro"] = np.mean(pro)
    out["figure"] = (out["image_auroc"] + out["pixel_aupro"]) / 2
    return out


def test_the_reference_aupro_on_a_case_by_hand():
    """Two 1x4 images: regions {0, 1} of image 0 (weight 1/4 a pixel) and {3} of image 1
    (weight 1/2); 5 normal pixels. From the top: (0,0) .9, (1,3) .8, (0,2) .7 normal, (0,1) .6,
    then normals. Points (0, .25), (0, .75), (.2, .75), (.2, 1), (.4, 1): the area up to FPR .3
    is .2 x .75 + .1 x 1 = .25, divided by .3."""
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
    masks[1, 0, 3] = 1
    maps = np.array([[[0.9, 0.6, 0.7, 0.1]], [[0.2, 0.3, 0.4, 0.8]]])
    assert reference_aupro(masks, maps) == pytest.approx(0.25 / 0.3)


# ---------------------------------------------------------------------------------------------
# The validation set
# ---------------------------------------------------------------------------------------------


class _Folder:
    """A category's train/good: image i is textured, with (category, i) written in its corner;
    every load is recorded."""

    def __init__(self, category: int, n: int, shape=(36, 44)):
        self.category, self.n, self.shape = category, n, shape
        self.loads: list[int] = []

    def __len__(self):
        return self.n

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.category, i])
        base = (sd.smooth_noise(self.shape, 4, rng) * 90 + 80).astype(np.uint8)
        out = np.repeat(base[..., None], 3, axis=-1)
        out[0, 0] = (self.category, i, 255)
        return out

    def load(self, i: int) -> np.ndarray:
        assert 0 <= i < self.n
        self.loads.append(i)
        return self.image(i)


def _identity(image) -> tuple[int, int]:
    return int(image[0, 0, 0]), int(image[0, 0, 1])


def test_the_validation_is_the_held_out_images_and_defects_in_them(monkeypatch):
    folders = [_Folder(0, 10), _Folder(1, 6)]
    held = [Item(0, 7), Item(0, 2), Item(1, 0)]
    train = [Item(c, i) for c, f in enumerate(folders) for i in range(len(f))]
    train = [it for it in train if it not in held]
    drawn = []
    real = sd.make_defects

    def spy(images, donors, per_image, seed, kinds):
        drawn.append(([_identity(x) for x in images], [_identity(x) for x in donors], kinds))
        return real(images, donors, per_image, seed, kinds)

    monkeypatch.setattr(sd, "make_defects", spy)
    kinds = ("faint_blob", "scratch", "matched_patch")
    val = validation.build_validation(
        folders, ["a", "b"], train, held, 2, seed=3, max_donors=3, kinds=kinds
    )

    assert val.names == ["a", "b"]
    assert [len(x) for x in val.images] == [2 + 4, 1 + 2]
    assert val.kinds == [
        ["normal", "normal", "faint_blob", "scratch", "matched_patch", "faint_blob"],
        ["normal", "faint_blob", "scratch"],
    ]
    assert val.counts() == {
        **dict.fromkeys(sd.KINDS, 0), "normal": 3, "faint_blob": 3, "scratch": 2,
        "matched_patch": 1,
    }  # fmt: skip
    assert [d[2] for d in drawn] == [kinds, kinds]
    # The normal ones are the held-out images, as they are, in their order
    for c, want in enumerate([[7, 2], [0]]):
        for k, i in enumerate(want):
            assert np.array_equal(val.images[c][k], folders[c].image(i))
            assert not val.masks[c][k].any() and val.masks[c][k].shape == (36, 44)
    # each defect is made in a held-out image of its category, exactly where its mask says
    for c, sources in enumerate([[7, 7, 2, 2], [0, 0]]):
        n_held = len(sources) // 2
        for image, mask, i in zip(
            val.images[c][n_held:], val.masks[c][n_held:], sources, strict=True
        ):
            original = folders[c].image(i)
            changed = np.any(image != original, axis=-1)
            assert mask.any() and not np.any(changed & (mask == 0))
    # Donors: distinct training images of the same category, at most max_donors; never held out
    train_of = {c: {it.index for it in train if it.category == c} for c in (0, 1)}
    for c, (images, donors, _) in enumerate(drawn):
        assert images == [(c, i) for i in ([7, 2] if c == 0 else [0])]
        assert len(donors) == 3 and len(set(donors)) == 3
        assert all(dc == c and i in train_of[c] for dc, i in donors), donors
    # Nothing else is read
    assert set(folders[0].loads) == {7, 2} | {i for _, i in drawn[0][1]}
    assert set(folders[1].loads) == {0} | {i for _, i in drawn[1][1]}


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------


def _flat(value: int, hw) -> np.ndarray:
    return np.full((*hw, 3), value, np.uint8)


def reference_smooth(maps: np.ndarray, size: int) -> np.ndarray:
    """`[N, H, W]`: the size x size box mean with zero padding and divisor size**2."""
    pad = size // 2
    padded = np.pad(maps.astype(np.float64), ((0, 0), (pad, pad), (pad, pad)))
    return sliding_window_view(padded, (size, size), axis=(1, 2)).mean(axis=(-2, -1))


def reference_scores(smoothed: np.ndarray, pool: int) -> np.ndarray:
    """`[N]`: the largest pool x pool 'valid' box mean of each smoothed map."""
    pool = min(pool, *smoothed.shape[1:])
    return sliding_window_view(smoothed, (pool, pool), axis=(1, 2)).mean(axis=(-2, -1)).max((1, 2))


def _figure_case():
    """Two categories: 'a' at the model's 16 x 16, 'b' at 32 x 32 (masks in 2 x 2 blocks, so
    the nearest-neighbour resize keeps them exactly). Each image is flat grey 10 + 7 x its id;
    the fake program returns a known GRAD and kNN raw map per id (the kNN maps of defective
    images 3x larger), and decoy 'score' and 'smoothed' outputs."""
    rng = np.random.default_rng(0)
    hw = (16, 16)
    n_a, n_b = 5, 4
    grad = rng.random((n_a + n_b, *hw)).astype(np.float32)
    grad[:, :4, :4] = 0.25  # ties inside the ranking
    knn = (2.0 + 5.0 * rng.random((n_a + n_b, *hw))).astype(np.float32)
    masks = np.zeros((n_a + n_b, *hw), np.uint8)
    masks[1, 2:6, 3:7] = 1
    masks[2, 10:12, 1:3] = 1
    masks[2, 12:15, 9:14] = 1  # two regions in one image
    masks[3, 0:16, 8] = 1
    masks[6, 4:8, 4:8] = 1
    masks[7, 9:11, 0:16] = 1
    defective = masks.reshape(len(masks), -1).any(axis=1)
    knn[defective] *= 3.0
    images = [_flat(10 + 7 * k, hw) for k in range(n_a)]
    images += [_flat(10 + 7 * k, (32, 32)) for k in range(n_a, n_a + n_b)]
    big = [np.kron(m, np.ones((2, 2), np.uint8)) for m in masks[n_a:]]
    labels = ["defect" if d else "normal" for d in defective]
    val = validation.ValidationSet(
        ["a", "b"], [images[:n_a], images[n_a:]], [list(masks[:n_a]), big],
        [labels[:n_a], labels[n_a:]],
    )  # fmt: skip
    batches = []

    def predict(batch):
        batches.append(batch.shape)
        ids = (batch[:, 0, 0, 0].astype(int) - 10) // 7
        decoy = np.zeros((len(ids), *hw), np.float32)
        return {"raw_grad": grad[ids], "raw_knn": knn[ids], "raw": decoy, "smoothed": decoy,
                "score": np.zeros(len(ids))}  # fmt: skip

    config = tiny.get_config()
    config.data.image_size = hw
    config.eval.batch_size = 3
    return val, predict, batches, config, {"grad": grad, "knn": knn}, masks, defective, n_a


def test_every_kind_is_scored_and_its_figure_is_the_mean_of_image_auroc_and_pixel_aupro():
    """Each kind's maps smoothed and scored here (numpy), 'grad+knn' the mean of both maps
    standardised by the pixel mean and std of the NORMAL images' raw maps (all categories,
    never a synthetic defect), then the figures of `reference_figures`."""
    val, predict, batches, config, raw, masks, defective, n_a = _figure_case()
    got = validation.validate(predict, val, config, ["grad", "knn", "grad+knn"])
    assert batches == [(3, 16, 16, 3), (2, 16, 16, 3), (3, 16, 16, 3), (1, 16, 16, 3)]
    stats = {
        k: {"mean": raw[k][~defective].mean(dtype=np.float64),
            "std": raw[k][~defective].std(dtype=np.float64)}
        for k in ("grad", "knn")
    }  # fmt: skip
    assert set(got["map_stats"]) == set(stats)
    for k, want in stats.items():
        assert got["map_stats"][k] == pytest.approx(want, rel=1e-6), k
    maps = dict(raw)
    maps["grad+knn"] = sum((raw[k] - stats[k]["mean"]) / stats[k]["std"] for k in raw) / 2
    assert list(got["kinds"]) == ["grad", "knn", "grad+knn"]
    for kind, raw_maps in maps.items():
        smoothed = reference_smooth(raw_maps, config.eval.smooth_size)
        scores = reference_scores(smoothed, config.eval.score_pool)
        want = reference_figures(
            [
                (scores[:n_a], smoothed[:n_a], masks[:n_a]),
                (scores[n_a:], smoothed[n_a:], masks[n_a:]),
            ]
        )
        assert got["kinds"][kind] == pytest.approx(want, abs=1e-6), kind
        # and the figure is not the pixel AUROC's: the two differ here
        assert abs(want["pixel_auroc"] - want["pixel_aupro"]) > 0.01
    # statistics of every image (defects included) would weigh the two maps otherwise
    every = {k: {"mean": raw[k].mean(), "std": raw[k].std()} for k in raw}
    assert every["knn"]["std"] > 1.5 * stats["knn"]["std"]


def test_grad_alone_needs_no_statistics_and_a_missing_map_is_named():
    val, predict, _, config, *_ = _figure_case()
    got = validation.validate(predict, val, config)  # GRAD alone, the default
    assert list(got["kinds"]) == ["grad"] and got["map_stats"] is None

    def grad_only(batch):
        out = predict(batch)
        del out["raw_knn"]
        return out

    with pytest.raises(SelectionError, match="model kind 'knn' cannot be scored.*raw_grad"):
        validation.validate(grad_only, val, config, ["grad", "knn"])


def test_the_real_split_feeds_the_validation():
    """On split_holdout's own items: every held-out image is a normal of the validation, and no
    held-out image is a donor (so the probes never saw any image of the validation)."""
    folders = [_Folder(0, 12)]
    shells = [input_pipeline.CategoryData("a", [None] * 12, None)]
    train, held = input_pipeline.split_holdout(shells, 0.25, seed=4)
    val = validation.build_validation(folders, ["a"], train, held, 1, seed=4)
    normals = [
        _identity(x) for x, k in zip(val.images[0], val.kinds[0], strict=True) if k == "normal"
    ]
    assert normals == [(0, it.index) for it in held] and len(held) == 3
    assert set(folders[0].loads) - {it.index for it in held} <= {it.index for it in train}
