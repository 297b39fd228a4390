"""The synthetic validation of recipe selection, built from normal training images only.

`TrainFolder` lists and decodes `<category>/train/good` directly, in the dataset builder's
sorted order (so positions match the dataset the final run reads); nothing outside `train/good`
is opened. `build_validation` shows each held-out normal image once as it is and with synthetic
defects (`synthetic_defects`, the kinds of `selection.defect_kinds`); `validate` scores a model
on that set as every competing model kind.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

import tfds_mvtec
from grad_jax.data import demo, input_pipeline
from grad_jax.data import synthetic_defects as sd
from grad_jax.errors import SelectionError
from grad_jax.evaluation import evaluate, metrics
from grad_jax.training.calibration import map_statistics
from tfds_mvtec.mvtec_ad import layout

log = logging.getLogger(__name__)

FIGURE = "mean of image AUROC and pixel AUPRO on the synthetic validation"


class TrainFolder:
    """The `train/good` images of one MVTec-layout category, in the dataset builder's order.

    Records look like the dataset's ({'image', 'mask', 'label', 'filename'}), so
    `input_pipeline.IndexedSource` reads them; nothing outside `train/good` is opened.
    """

    def __init__(self, root: pathlib.Path, skip_bad_images: bool = False):
        folder = root / "train" / "good"
        if not folder.is_dir():
            raise SelectionError(
                f"{folder} does not exist: selection needs the training images of an MVTec-layout "
                "folder (PATH/train/good/*.png)"
            )
        paths = [p for p in sorted(folder.iterdir()) if not p.is_dir() and layout.is_image_name(p)]
        if skip_bad_images:  # the builder leaves unreadable files out: so must we
            kept = []
            for p in paths:
                try:
                    tfds_mvtec.load_rgb(p)
                    kept.append(p)
                except tfds_mvtec.BadImageError as err:
                    log.warning("selection skips %s", err)
            paths = kept
        self.root = root
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        try:
            return tfds_mvtec.load_rgb(self.paths[i])
        except tfds_mvtec.DatasetLayoutError as err:
            raise input_pipeline.DataLayoutError(str(err)) from err

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.load(i)
        return {
            "image": image,
            "mask": np.zeros(image.shape[:2], np.uint8),
            "label": 0,
            "filename": self.paths[i].relative_to(self.root).as_posix(),
        }


def category_roots(config: ml_collections.ConfigDict) -> list[pathlib.Path]:
    """The category folders of a 'folder' or 'demo' config (as `open_categories` finds them)."""
    d = config.data
    if d.dataset == "demo":
        root = demo.ensure_demo_dataset(d.root)
    elif d.dataset == "folder":
        if not d.root or not pathlib.Path(d.root).is_dir():
            raise SelectionError(
                f"config.data.root={d.root!r} is not a folder: pass --config.data.root=PATH"
            )
        root = d.root
    else:
        raise SelectionError(
            f"config.select works with data.dataset 'folder' or 'demo', not {d.dataset!r}"
        )
    return input_pipeline._folder_categories(pathlib.Path(root))


# ---------------------------------------------------------------------------------------------
# The synthetic validation set
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ValidationSet:
    """Per category: original-size images, masks (all-zero for the normal ones), defect kinds."""

    names: list[str]
    images: list[list[np.ndarray]]
    masks: list[list[np.ndarray]]
    kinds: list[list[str]]

    def counts(self) -> dict[str, int]:
        flat = [k for ks in self.kinds for k in ks]
        return {k: flat.count(k) for k in ["normal", *sd.KINDS]}


def defect_kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The synthetic defect kinds of `selection.defect_kinds` ('all', or a comma list of
    `synthetic_defects.KINDS`), in the order given."""
    text = config.selection.get("defect_kinds", "all").strip()
    if text == "all":
        return sd.KINDS
    given = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in given if k not in sd.KINDS]
    if unknown or not given:
        raise SelectionError(
            f"selection.defect_kinds={text!r}: 'all', or a comma list of {', '.join(sd.KINDS)}"
        )
    return given


def build_validation(
    folders: Sequence[TrainFolder],
    names: Sequence[str],
    train_items: Sequence[input_pipeline.Item],
    held_items: Sequence[input_pipeline.Item],
    per_image: int,
    seed: int,
    max_donors: int = 32,
    kinds: Sequence[str] = sd.KINDS,
) -> ValidationSet:
    """Held-out normal images as they are, plus `per_image` synthetic defects in each (`kinds`
    in turn); the patch kinds' patches come from (at most `max_donors`) training images of the
    same category."""
    rng = np.random.default_rng([seed, 1234])
    out = ValidationSet(list(names), [], [], [])
    for c, folder in enumerate(folders):
        held = [folder.load(it.index) for it in held_items if it.category == c]
        pool = [it.index for it in train_items if it.category == c]
        picks = rng.choice(pool, size=min(max_donors, len(pool)), replace=False) if pool else []
        donors = [folder.load(int(i)) for i in picks]
        defects = sd.make_defects(held, donors, per_image, seed + c, tuple(kinds))
        out.images.append(held + [d[2] for d in defects])
        out.masks.append([np.zeros(x.shape[:2], np.uint8) for x in held] + [d[3] for d in defects])
        out.kinds.append(["normal"] * len(held) + [d[1] for d in defects])
    return out


def validate(
    predict, val: ValidationSet, config: ml_collections.ConfigDict, kinds: Sequence[str] = ("grad",)
) -> dict[str, Any]:
    """Every model kind of `kinds` scored on the synthetic validation, in one pass of `predict`
    (an all-kinds program, `make_predict_fn(..., all_kinds=True)`: its 'raw_grad' and, with a
    memory bank, 'raw_knn' maps). Each kind's maps are smoothed and scored as evaluation does
    (`evaluate.score_kinds`); 'grad+knn' standardises both maps by the pixel statistics of the
    validation's normal images (`calibration.map_statistics`), which are the held-out normal
    training images, never a synthetic defect: the images the full run standardises by.

    Returns {'kinds': {kind: {'image_auroc', 'pixel_auroc', 'pixel_aupro', 'figure'}},
    'map_stats': {kind: {'mean', 'std'}} or None (only 'grad+knn' needs them)}; the figure is
    the mean of image AUROC and pixel AUPRO, each the unweighted mean over categories.
    """
    size = tuple(config.data.image_size)
    raws, truths = [], []
    for images, masks in zip(val.images, val.masks, strict=True):
        resized = np.stack([input_pipeline.resize_image(x, size) for x in images])
        truths.append(np.stack([input_pipeline.resize_mask(m, size) for m in masks]))
        parts = []
        for start in range(0, len(resized), config.eval.batch_size):
            out = predict(resized[start : start + config.eval.batch_size])
            parts.append({k: v for k, v in out.items() if k.startswith("raw_")})
        raws.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    stats = None
    if "grad+knn" in kinds:
        normals = [
            {k: v[i] for k, v in raw.items()}
            for raw, labels in zip(raws, val.kinds, strict=True)
            for i, label in enumerate(labels)
            if label == "normal"
        ]
        if not normals:
            raise SelectionError("the synthetic validation has no normal image to standardise by")
        stats = map_statistics(normals)
    per_kind: dict[str, dict[str, metrics.CategoryResults]] = {k: {} for k in kinds}
    for name, raw, gt in zip(val.names, raws, truths, strict=True):
        labels = gt.reshape(len(gt), -1).any(axis=1).astype(np.int32)
        scored = evaluate.score_kinds(raw, config, stats)
        for kind in kinds:
            if kind not in scored:
                raise SelectionError(
                    f"model kind {kind!r} cannot be scored: the predict program gave "
                    f"{', '.join(sorted(raw))} (a kNN kind needs the memory bank)"
                )
            scores, smoothed = scored[kind]
            per_kind[kind][name] = metrics.CategoryResults(scores, labels, smoothed, gt)
    return {"kinds": {k: figures(per_kind[k]) for k in kinds}, "map_stats": stats}


def figures(per_class: dict[str, metrics.CategoryResults]) -> dict[str, float]:
    """Image AUROC, pixel AUROC, pixel AUPRO (means over classes) and their figure."""
    values, _ = metrics.summarise(per_class)
    out = {k: values[f"mean/{k}"] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    out["figure"] = 0.5 * (out["image_auroc"] + out["pixel_aupro"])
    return out


# ---------------------------------------------------------------------------------------------
