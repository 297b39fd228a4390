"""Evaluation: score every test image (`grad_jax.inference.device_program`), then metrics.json
and the report.

Only the predict program's results come back to the host, where `metrics` computes AUROC, AUPRO,
AP and F1-max per category.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from grad_jax.config import AUTO_SIZE, tiling_on, validate_config
from grad_jax.data import input_pipeline
from grad_jax.devices import sharding
from grad_jax.evaluation import metrics
from grad_jax.evaluation.report import write_report
from grad_jax.files import atomic_write_json
from grad_jax.inference import device_program
from grad_jax.inference.decisions import nearest_centre
from grad_jax.runs import run_folder

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class CategoryEval(metrics.CategoryResults):
    """One category's test split: what the metrics need (`metrics.CategoryResults`: scores,
    labels, smoothed maps, masks, has_mask) and what the report adds to it.

    `labels` follow the reference's rule: where the mask is known, 1 if the (resized) mask has a
    positive pixel; otherwise the folder's (good vs defect).
    """

    name: str
    filenames: list[str]
    source: Any = None  # IndexedSource, to re-read images for the report
    folder_labels: np.ndarray | None = None  # [N] 0 for test/good, 1 for test/<defect>
    pooled: np.ndarray | None = None  # [N, D] pooled backbone features (class recognition)

    def label_disagreements(self) -> list[str]:
        """Files whose mask-derived label differs from their folder's (masked images only)."""
        if self.folder_labels is None:
            return []
        known = np.ones(len(self.labels), bool) if self.has_mask is None else self.has_mask
        differ = known & ((np.asarray(self.labels) != 0) != (self.folder_labels != 0))
        return [f for f, d in zip(self.filenames, differ, strict=True) if d]


def predict_items(
    predict: Callable, source: input_pipeline.IndexedSource, batch: int, desc: str = ""
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(inputs, outputs) per batch over all of `source`; every process reads whole batches."""
    order = np.arange(len(source))
    it = input_pipeline.batches(source, order, batch, split_processes=False)
    bar = tqdm.tqdm(total=len(source), desc=desc, disable=jax.process_index() != 0, leave=False)
    for inputs in it:
        outputs = predict(inputs["image"])
        bar.update(len(next(iter(outputs.values()))))
        yield inputs, outputs
    bar.close()


def evaluate_categories(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    config: ml_collections.ConfigDict,
) -> list[CategoryEval]:
    """Score every test image of every category. With tiling, images are read at their tiling
    scale and scored by their stitched maps; maps and masks are then at that size."""
    names = [c.name for c in categories]
    predict = device_program.whole_image_fn(predict, config)
    tests = [x.test for x in categories]
    results = []
    for c, cat in enumerate(categories):
        items = input_pipeline.test_items(categories, c)
        size = input_pipeline.eval_image_size(config, tests, items)
        source = input_pipeline.IndexedSource(tests, items, size, names)
        scores, maps, masks, files, known, folder, pooled = [], [], [], [], [], [], []
        for inputs, outputs in predict_items(
            predict, source, config.eval.batch_size, f"eval {cat.name}"
        ):
            scores.append(outputs["score"])
            maps.append(outputs["smoothed"])
            masks.append(inputs["mask"])
            known.append(inputs["has_mask"])
            folder.append(inputs["label"])
            pooled.append(outputs["pooled"])
            files.extend(inputs["filename"].tolist())
        masks_np = np.concatenate(masks)
        has_mask = np.concatenate(known).astype(bool)
        folder_labels = np.concatenate(folder).astype(np.int32)
        results.append(
            CategoryEval(
                np.concatenate(scores),
                image_labels(masks_np, has_mask, folder_labels),
                np.concatenate(maps),
                masks_np,
                has_mask,
                name=cat.name,
                filenames=files,
                source=source,
                folder_labels=folder_labels,
                pooled=np.concatenate(pooled),
            )
        )
    return results


def image_labels(masks: np.ndarray, has_mask: np.ndarray, folder_labels: np.ndarray) -> np.ndarray:
    """`[N]` int32 image labels: any positive mask pixel where the mask is known (the
    reference's rule, on the resized mask), else the folder's label (good vs defect).

    masks `[N, H, W]`, has_mask `[N]` bool, folder_labels `[N]` 0/1.
    """
    from_masks = masks.reshape(len(masks), -1).any(axis=1)
    return np.where(has_mask, from_masks, folder_labels != 0).astype(np.int32)


def compute_metrics(
    results: Sequence[CategoryEval], threshold: float | None = None
) -> tuple[dict[str, float], list[str]]:
    """`metrics.summarise` of every category, plus, when a decision `threshold` (image score) is
    known, `<category>/false_alarm_rate`: the share of good test images at or above it (the one
    figure a test split of good images only can give)."""
    values, notes = metrics.summarise({r.name: r for r in results})
    for r in results:
        files = r.label_disagreements()
        if files:
            notes.append(
                f"{r.name}: {len(files)} image(s) of a defect folder have a mask that is empty "
                "at the evaluation size (or a good image a non-empty one); their label follows "
                "the mask, as the reference's: "
                + ", ".join(files[:10])
                + (" ..." if len(files) > 10 else "")
            )
    if threshold is not None:
        rates = []
        for r in results:
            value = metrics.false_alarm_rate(r.labels, r.scores, threshold)
            values[f"{r.name}/false_alarm_rate"] = value
            if not np.isnan(value):
                rates.append(value)
        values["mean/false_alarm_rate"] = float(np.mean(rates)) if rates else float("nan")
    return values, notes


def label_report(results: Sequence[CategoryEval]) -> dict[str, Any]:
    """metrics.json entries about the ground truth: mask-vs-folder label disagreements (count
    and files per category) and how many test images have no mask, where there are any."""
    out: dict[str, Any] = {}
    disagree = {r.name: r.label_disagreements() for r in results}
    disagree = {k: {"count": len(v), "files": v} for k, v in disagree.items() if v}
    if disagree:
        out["label_disagreements"] = disagree
    unmasked = {
        r.name: int(np.count_nonzero(~r.has_mask))
        for r in results
        if r.has_mask is not None and not r.has_mask.all()
    }
    if unmasked:
        out["images_without_mask"] = unmasked
    return out


def _threshold_value(threshold: Any) -> float | None:
    value = (threshold or {}).get("image_score") if isinstance(threshold, dict) else threshold
    return None if value is None else float(value)


def recognition_accuracy(
    results: Sequence[CategoryEval], centres: dict[str, Any]
) -> dict[str, float]:
    """'<category>/recognition_accuracy': the fraction of its test images whose nearest class
    centre is their own class; 'mean/recognition_accuracy': the unweighted mean over classes."""
    names = list(centres["names"])
    table = np.asarray(centres["centres"], np.float32)
    out = {}
    for r in results:
        if r.pooled is None or not len(r.pooled):
            continue
        guess = nearest_centre(r.pooled, table)
        out[f"{r.name}/recognition_accuracy"] = float(np.mean([names[g] == r.name for g in guess]))
    if out:
        out["mean/recognition_accuracy"] = float(np.mean(list(out.values())))
    return out


def publish(
    workdir: str,
    results: Sequence[CategoryEval],
    info: dict[str, Any],
    centres: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Metrics of `results` -> metrics.json, a printed table, and the visual report (process 0
    writes; every process gets the values). `info` goes into metrics.json as it is; its
    "threshold" and "selection" (a recipe selection's record) also go to the report. With class
    `centres` and several classes, the class recognition accuracy on the test images is added."""
    values, notes = compute_metrics(results, _threshold_value(info.get("threshold")))
    if centres and len(results) > 1:
        recognition = recognition_accuracy(results, centres)
        values.update(recognition)
        if jax.process_index() == 0 and recognition:
            print(
                "class recognition (nearest class centre) on the test images: "
                + ", ".join(f"{k.split('/')[0]} {100 * v:.1f}%" for k, v in recognition.items())
            )
    if jax.process_index() == 0:
        write_metrics(workdir, values, notes, {**label_report(results), **info})
        print(metrics.format_table(values))
        for note in notes:
            print("note:", note)
        write_report(
            workdir, results, values, info.get("threshold"), selection=info.get("selection")
        )
    return values


def write_metrics(
    workdir: str,
    values: dict[str, float],
    notes: list[str],
    extra: dict[str, Any] | None = None,
    filename: str = "metrics.json",
) -> str:
    """metrics.json: flat metric keys plus 'notes' and run information.

    An undefined metric (nan: e.g. pixel metrics without masks, image AUROC without defective
    images) is written as the string "n/a", never as 0.
    """
    payload: dict[str, Any] = {
        k: (metrics.NOT_AVAILABLE if np.isnan(v) else float(v)) for k, v in values.items()
    }
    payload["notes"] = list(notes)
    payload.update(extra or {})
    path = os.path.join(workdir, filename)
    atomic_write_json(path, payload, indent=1, sort_keys=True)
    return path


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict:
    """--mode=eval: reload the latest checkpoint of `workdir` and evaluate it on the test data
    of `config` (default: the run's own config.json). Writes metrics.json and the report, with
    the run's finished recipe selection (`selection.json`, without its "config") when it has
    one, as training writes them."""
    sharding.maybe_initialize_distributed()
    if config is not None:
        validate_config(config, training=False)
        config = config.copy_and_resolve_references()
        with config.ignore_type():  # the model input the run trained at
            if tiling_on(config):
                config.data.image_size = (config.data.tile.size, config.data.tile.size)
            elif config.data.image_size == AUTO_SIZE:
                config.data.image_size = tuple(run_folder.read_config(workdir).data.image_size)
    trained = run_folder.load_trained(workdir, config=config)
    config = trained.config
    categories = input_pipeline.open_categories(config)
    predict = device_program.make_predict_fn(trained.variables, config)
    results = evaluate_categories(predict, categories, config)
    info = {"model": f"checkpoint step {trained.step}", "threshold": trained.meta.get("threshold")}
    selection = run_folder.read_selection(workdir)
    if selection is not None:
        info["selection"] = run_folder.selection_summary(selection)
    return publish(workdir, results, info, trained.meta.get("class_centres"))
