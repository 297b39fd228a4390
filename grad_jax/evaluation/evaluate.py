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
from grad_jax.inference.decisions import UNKNOWN_CLASS, Decisions
from grad_jax.inference.scorer import finish_maps
from grad_jax.models import knn
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
    # Every model kind scored on the split: kind -> (scores [N], smoothed maps [N, H, W]); the
    # fields above hold the run's own kind (`model.kind`).
    kinds: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    def as_kind(self, kind: str) -> CategoryEval:
        """This category as scored by `kind` (one of `kinds`)."""
        scores, maps = self.kinds[kind]
        return dataclasses.replace(self, scores=scores, maps=maps, kinds={})

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


def available_kinds(outputs: dict[str, Any], map_stats: dict | None) -> list[str]:
    """The model kinds a predict program's outputs (with 'raw_<kind>' maps) can be scored as."""
    kinds = [k for k in ("grad", "knn") if f"raw_{k}" in outputs]
    if len(kinds) == 2 and map_stats:
        kinds.append("grad+knn")
    return kinds


def score_kinds(
    outputs: dict[str, np.ndarray], config: ml_collections.ConfigDict, map_stats: dict | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (image scores `[B]`, smoothed maps `[B, H, W]`) of a batch of program outputs
    with every kind's raw map ('raw_grad', 'raw_knn'): each kind's map (`knn.kind_map`)
    smoothed and scored by the evaluation recipe."""
    maps = {k[len("raw_") :]: v for k, v in outputs.items() if k.startswith("raw_")}
    out = {}
    for kind in available_kinds(outputs, map_stats):
        raw = knn.kind_map(kind, maps, map_stats)
        smoothed, scores = finish_maps(raw, config.eval.smooth_size, config.eval.score_pool)
        out[kind] = (scores, smoothed)
    return out


def evaluate_categories(
    predict: Callable,
    categories: Sequence[input_pipeline.CategoryData],
    config: ml_collections.ConfigDict,
    map_stats: dict | None = None,
) -> list[CategoryEval]:
    """Score every test image of every category, as every model kind the program's outputs
    allow (`predict` from `make_predict_fn(..., all_kinds=True)`; `map_stats` for 'grad+knn').
    With tiling, images are read at their tiling scale and scored by their stitched maps; maps
    and masks are then at that size."""
    names = [c.name for c in categories]
    predict = device_program.whole_image_fn(predict, config)
    tests = [x.test for x in categories]
    kind = config.model.get("kind", "grad")
    results = []
    for c, cat in enumerate(categories):
        items = input_pipeline.test_items(categories, c)
        size = input_pipeline.eval_image_size(config, tests, items)
        source = input_pipeline.IndexedSource(tests, items, size, names)
        by_kind: dict[str, list] = {}
        masks, files, known, folder, pooled = [], [], [], [], []
        for inputs, outputs in predict_items(
            predict, source, config.eval.batch_size, f"eval {cat.name}"
        ):
            for k, scored in score_kinds(outputs, config, map_stats).items():
                by_kind.setdefault(k, []).append(scored)
            masks.append(inputs["mask"])
            known.append(inputs["has_mask"])
            folder.append(inputs["label"])
            pooled.append(outputs["pooled"])
            files.extend(inputs["filename"].tolist())
        kinds = {
            k: (np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts]))
            for k, parts in by_kind.items()
        }
        masks_np = np.concatenate(masks)
        has_mask = np.concatenate(known).astype(bool)
        folder_labels = np.concatenate(folder).astype(np.int32)
        scores, maps = kinds[kind]
        results.append(
            CategoryEval(
                scores,
                image_labels(masks_np, has_mask, folder_labels),
                maps,
                masks_np,
                has_mask,
                name=cat.name,
                filenames=files,
                source=source,
                folder_labels=folder_labels,
                pooled=np.concatenate(pooled),
                kinds=kinds,
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
    results: Sequence[CategoryEval], threshold: dict | float | None = None
) -> tuple[dict[str, float], list[str]]:
    """`metrics.summarise` of every category, plus the decision figures at the threshold each
    class is decided with (`decision_rates`) when a `threshold` is known."""
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
        values.update(decision_rates(results, threshold))
    return values, notes


def applied_threshold(threshold: dict | float, category: str) -> tuple[float | None, float | None]:
    """(threshold, guaranteed false-alarm rate or None) that images of `category` are decided
    with: the class's own, else the run's (`threshold` as calibration stores it), or a number."""
    if not isinstance(threshold, dict):
        return float(threshold), None
    own = (threshold.get("per_category") or {}).get(category)
    guarantees = threshold.get("guarantee") or {}
    if own is not None:
        g = (guarantees.get("per_category") or {}).get(category) or {}
        return float(own), g.get("guarantee")
    run = threshold.get("image_score")
    return (
        (None, None)
        if run is None
        else (float(run), (guarantees.get("run") or {}).get("guarantee"))
    )


def decision_rates(results: Sequence[CategoryEval], threshold: dict | float) -> dict[str, float]:
    """At the threshold each class's test images are decided with (`applied_threshold`):
    '<category>/false_alarm_rate' (share of its good test images flagged), '/miss_rate' (share
    of its defective images passed), '/false_alarm_guarantee' (what the threshold's rule
    guarantees, when known), and their unweighted means over classes ('mean/...')."""
    values: dict[str, float] = {}
    for r in results:
        t, guarantee = applied_threshold(threshold, r.name)
        if t is None:
            continue
        values[f"{r.name}/false_alarm_rate"] = metrics.false_alarm_rate(r.labels, r.scores, t)
        values[f"{r.name}/miss_rate"] = metrics.miss_rate(r.labels, r.scores, t)
        if guarantee is not None:
            values[f"{r.name}/false_alarm_guarantee"] = float(guarantee)
    for key in ("false_alarm_rate", "miss_rate", "false_alarm_guarantee"):
        found = [v for k, v in values.items() if k.endswith("/" + key) and not np.isnan(v)]
        if any(k.endswith("/" + key) for k in values):
            values[f"mean/{key}"] = float(np.mean(found)) if found else float("nan")
    return values


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


def recognition_accuracy(
    results: Sequence[CategoryEval], centres: dict[str, Any]
) -> dict[str, float]:
    """'<category>/recognition_accuracy': the fraction of its test images recognised as their
    own class, as a deployed model recognises them (`inference.decisions`: the nearest class
    centre, unless it lies farther than that class's radius); with radii also
    '<category>/unknown_class_rate', the fraction rejected as an unknown kind of part; and
    'mean/...' the unweighted means over classes."""
    names = list(centres["names"])
    decisions = Decisions({"categories": names, "class_centres": centres})
    out: dict[str, float] = {}
    for r in results:
        if r.pooled is None or not len(r.pooled):
            continue
        found = decisions.categories_for(len(r.pooled), None, np.asarray(r.pooled))
        out[f"{r.name}/recognition_accuracy"] = float(
            np.mean([f.category == r.name for f in found])
        )
        if any(radius is not None for radius in decisions.radii):
            unknown = [f.how == UNKNOWN_CLASS for f in found]
            out[f"{r.name}/unknown_class_rate"] = float(np.mean(unknown))
    for key in ("recognition_accuracy", "unknown_class_rate"):
        values = [v for k, v in out.items() if k.endswith("/" + key)]
        if values:
            out[f"mean/{key}"] = float(np.mean(values))
    return out


def _recognition_line(recognition: dict[str, float]) -> str:
    """The printed line of `recognition_accuracy`'s figures."""
    parts = []
    for key, value in recognition.items():
        name, _, what = key.partition("/")
        if what != "recognition_accuracy":
            continue
        unknown = recognition.get(f"{name}/unknown_class_rate")
        extra = "" if unknown is None else f" ({100 * unknown:.1f}% taken for an unknown class)"
        parts.append(f"{name} {100 * value:.1f}%{extra}")
    return "class recognition (nearest class centre) on the test images: " + ", ".join(parts)


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
    values, notes = compute_metrics(results, info.get("threshold"))
    if centres and len(results) > 1:
        recognition = recognition_accuracy(results, centres)
        values.update(recognition)
        if jax.process_index() == 0 and recognition:
            print(_recognition_line(recognition))
    kinds = kind_metrics(results, info)
    if jax.process_index() == 0:
        extra = {**label_report(results), **info, "kinds": _as_json(kinds)}
        write_metrics(workdir, values, notes, extra)
        print(metrics.format_table(values))
        if len(kinds) > 1:
            print(kinds_table(kinds, info.get("kind")))
        for note in notes:
            print("note:", note)
        write_report(
            workdir,
            results,
            values,
            info.get("threshold"),
            selection=info.get("selection"),
            kinds=kinds,
            kind=info.get("kind"),
        )
    return values


def decision_info(meta: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What metrics.json and the report say of a model's decisions: its threshold, its kind and
    every kind's thresholds (as calibration stored them in the run's `meta`)."""
    return {
        "threshold": meta.get("threshold"),
        "kind": config.model.get("kind", "grad"),
        "kinds": meta.get("kinds") or {},
    }


def kind_metrics(results: Sequence[CategoryEval], info: dict[str, Any]) -> dict[str, dict]:
    """kind -> flat metric values of every model kind the results hold, each decided at its own
    thresholds (`info["kinds"][kind]["threshold"]`, as calibration stores them; the run's own
    kind at `info["threshold"]`)."""
    if not results or not results[0].kinds:
        return {}
    thresholds = {k: (v or {}).get("threshold") for k, v in (info.get("kinds") or {}).items()}
    out = {}
    for kind in results[0].kinds:
        threshold = thresholds.get(kind)
        if threshold is None and kind == info.get("kind"):
            threshold = info.get("threshold")
        out[kind], _ = compute_metrics([r.as_kind(kind) for r in results], threshold)
    return out


def kinds_table(kinds: dict[str, dict], deployed: str | None) -> str:
    """The model kinds side by side (means over classes, in %), as plain text."""
    columns = metrics.KIND_COLUMNS
    widths = [len(title) + 2 for _, title in columns]
    rows = [
        f"{'kind':<10}" + "".join(f"{t:>{w}}" for (_, t), w in zip(columns, widths, strict=True))
    ]
    for kind, values in kinds.items():
        cells = []
        for (key, _), width in zip(columns, widths, strict=True):
            v = values.get(f"mean/{key}", float("nan"))
            cells.append(f"{'n/a' if np.isnan(v) else f'{100 * v:.1f}':>{width}}")
        mark = "  (this run's kind)" if kind == deployed else ""
        rows.append(f"{kind:<10}" + "".join(cells) + mark)
    return "model kinds on the test split (means over classes, %):\n" + "\n".join(rows)


def _as_json(kinds: dict[str, dict]) -> dict[str, dict]:
    return {
        kind: {k: (metrics.NOT_AVAILABLE if np.isnan(v) else float(v)) for k, v in values.items()}
        for kind, values in kinds.items()
    }


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
    stats = device_program.map_stats(trained.meta)
    predict = device_program.make_predict_fn(trained.variables, config, None, stats, all_kinds=True)
    results = evaluate_categories(predict, categories, config, stats)
    info = {"model": f"checkpoint step {trained.step}", **decision_info(trained.meta, config)}
    selection = run_folder.read_selection(workdir)
    if selection is not None:
        info["selection"] = run_folder.selection_summary(selection)
    return publish(workdir, results, info, trained.meta.get("class_centres"))
