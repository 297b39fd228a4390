"""Label-free recipe selection: `--config.select=auto` (or a list of candidates).

A new dataset brings only normal training images we may learn from; its test defects must not
guide any choice. So the choice is made on a validation set built from normal TRAINING images
alone:

1. The held-out normal images (`threshold.holdout_fraction` of the training images, never
   trained on; the same ones later set the decision threshold) each appear once as they are
   (normal) and `selection.defects_per_image` times with a synthetic defect with an exact mask
   (`validation`, `synthetic_defects`: easy ones (patches cut from other training images, noise
   blobs, scratches, brightness holes) and hard ones whose contrast follows the image's own
   texture (faint small blobs, 1 px scratches, other training images' content shifted or
   pasted where it matches the surroundings); `selection.defect_kinds`).
2. Every candidate recipe (`candidates`: backbone, input size, backbone stages) trains briefly
   (`selection.probe_epochs`) on exactly the images the final run will train on, through the
   training loop itself, from backbone features cached once per (backbone, size, stages), and
   is scored on that validation set at a few epochs (`probes`) as every model kind of
   `selection.kinds` (grad, knn, grad+knn; the kNN memory bank is built once per recipe from
   the same cache, and 'grad+knn' standardised by the validation's normal images): the
   candidates are (recipe, kind) pairs, and a pair's figure is the mean of image AUROC and
   pixel AUPRO.
3. With `selection.budget_minutes` (the whole run), probes stop at `selection.max_share` of it;
   a candidate competes if its full run can train at least 80% of the epochs the config's own
   recipe could (that one always competes; epoch times come from the fastest measured rate
   per unit of head cost, since the load of a shared machine changes between probes), and the
   winner trains the epochs that fit (at most `train.epochs`, the learning-rate step moved in
   proportion; `budget`); the kinds of a recipe share its training and its budget. The best
   figure wins, ties going to the earlier recipe, then to the earlier kind (grad, knn,
   grad+knn); the winner's full run gets its recipe and `model.kind`. Its probe state is
   exactly the first epochs of its full run (same images, order, seeds, learning-rate schedule
   and training loop), so it is written as that run's first checkpoint and training continues
   from it.

Only `<root>/train/good` is read before the final evaluation (`validation` lists and decodes it
directly), never the dataset build, which also reads the test split.

The candidates, their validation figures, times and the choice go to `<workdir>/selection.json`
(`run_folder.SELECTION_FILE`, written as soon as the winner is known: a rerun goes straight back
to the final training), and, without the winner's config, into `metrics.json` under "selection"
and the report (by the evaluation, also in `--mode=eval`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from grad_jax.config import AUTO_SIZE, tiling_on, validate_config
from grad_jax.data import input_pipeline
from grad_jax.devices import sharding
from grad_jax.errors import SelectionError
from grad_jax.files import atomic_write_json
from grad_jax.runs import checkpointing, run_folder
from grad_jax.selection import budget, probes
from grad_jax.selection.candidates import candidates, competing_kinds, kind_figures
from grad_jax.selection.validation import (
    FIGURE,
    TrainFolder,
    ValidationSet,
    build_validation,
    category_roots,
    defect_kinds,
)
from grad_jax.training import loop
from grad_jax.training.run_records import METRICS_LOG

log = logging.getLogger(__name__)


def validate_selection_config(config: ml_collections.ConfigDict) -> None:
    s = config.selection
    problems = []
    if config.threshold.holdout_fraction <= 0:
        problems.append(
            "selection validates on the held-out normal images: set threshold.holdout_fraction > 0"
        )
    if s.probe_epochs < 1:
        problems.append(f"selection.probe_epochs={s.probe_epochs} must be at least 1")
    if s.defects_per_image < 1:
        problems.append(f"selection.defects_per_image={s.defects_per_image} must be >= 1")
    if not 0 < s.max_share <= 1:
        problems.append(f"selection.max_share={s.max_share} must be in (0, 1]")
    if s.budget_minutes < 0:
        problems.append(f"selection.budget_minutes={s.budget_minutes} must be >= 0 (0: none)")
    for parse in (competing_kinds, defect_kinds):
        try:
            parse(config)
        except SelectionError as err:
            problems.append(str(err))
    if "knn" in s.get("kinds", "") and config.knn.fraction <= 0:
        problems.append(
            f"selection.kinds={s.kinds!r} includes kinds that read the kNN memory bank, which "
            "knn.fraction=0 turns off: set knn.fraction > 0, or --config.selection.kinds=grad"
        )
    if problems:
        raise SelectionError("invalid selection config:\n  " + "\n  ".join(problems))


@dataclasses.dataclass
class _SelectionData:
    """The training images (never a test file) and the synthetic validation made from them."""

    config: ml_collections.ConfigDict  # with data.image_size resolved
    folders: list[TrainFolder]
    names: list[str]
    train_items: list[input_pipeline.Item]
    validation: ValidationSet


def selection_data(config: ml_collections.ConfigDict) -> _SelectionData:
    """The training items and the synthetic validation of `config`'s data (training images
    only), with `data.image_size` 'auto' resolved from the training images."""
    roots = category_roots(config)
    names = [r.name for r in roots]
    folders = [TrainFolder(r, config.data.skip_bad_images) for r in roots]
    shells = [input_pipeline.CategoryData(n, f, None) for n, f in zip(names, folders, strict=True)]
    train_items, held_items = input_pipeline.split_holdout(
        shells, config.threshold.holdout_fraction, config.seed
    )
    if not train_items:
        raise SelectionError("no training images left after holding out the validation share")
    if tiling_on(config):
        raise SelectionError(
            "config.select does not combine with data.tile yet: choose the tiling yourself "
            "(--config.data.tile.size=0 to select among whole-image recipes)"
        )
    if config.data.image_size == AUTO_SIZE:  # measured on training images only
        config = config.copy_and_resolve_references()
        config.data.image_size = input_pipeline.resolve_image_size(config, shells)
    val = build_validation(
        folders, names, train_items, held_items, config.selection.defects_per_image,
        config.seed, kinds=defect_kinds(config),
    )  # fmt: skip
    log.info("selection: synthetic validation %s", val.counts())
    return _SelectionData(config, folders, names, train_items, val)


def probe_all(data: _SelectionData, workdir: str, record: dict[str, Any], started: float):
    """(probes, skipped): every candidate probed while the budget's probing share allows;
    selection.json is rewritten after each probe."""
    config = data.config
    shared = probes.SharedFeatures()
    done: list[probes.Probe] = []
    skipped: list[dict[str, Any]] = []
    for k, cand in enumerate(candidates(config)):
        reason = budget.skip_reason(cand, done[0].record, config, started) if k else None
        if reason:
            skipped.append({"name": cand.name, "reason": reason})
            log.info("selection: %s skipped (%s)", cand.name, reason)
            continue
        source = input_pipeline.IndexedSource(
            data.folders, data.train_items, cand.image_size, data.names, masks=False
        )
        log_dir = os.path.join(workdir, "selection", cand.slug)
        deadline = budget.probe_deadline(config, started)
        done.append(probes.probe(cand, config, source, data.validation, shared, log_dir, deadline))
        _write(workdir, {**record, "candidates": [p.record for p in done], "skipped": skipped})
    return done, skipped


def select(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Probe every candidate, choose one, and prepare `workdir` for its full run.

    Returns the selection record (also written to `<workdir>/selection.json`), whose "config"
    holds the winner's full config as JSON.
    """
    started = time.time()
    data = selection_data(config)
    config = data.config
    record = new_record(config, data)
    done, skipped = probe_all(data, workdir, record, started)
    elapsed = time.time() - started
    winner, kind = budget.choose(done, config, config.selection.budget_minutes * 60.0 - elapsed)
    epochs, lr_step = budget.final_schedule(config, winner.record)
    record.update(
        candidates=[p.record for p in done],
        skipped=skipped,
        winner=winner.candidate.name,
        winner_kind=kind,
        selection_seconds=elapsed,
        final_epochs=epochs,
        final_lr_step_epochs=lr_step,
    )
    final = budget.final_config(config, record)
    # The probe is the start of the full run if it did not reach a learning-rate step.
    reusable = winner.record["probe_epochs"] <= min(epochs, lr_step)
    record["config"] = json.loads(final.to_json_best_effort())
    # The choice is on disk before the checkpoint: a rerun after a crash in between then trains
    # the winner from the start instead of choosing again next to a stray checkpoint.
    record["reused_probe"] = False
    _write(workdir, record)
    if reusable and _reuse(winner, final, workdir):
        record["reused_probe"] = True
        _write(workdir, record)
    return record


def new_record(config: ml_collections.ConfigDict, data: _SelectionData) -> dict[str, Any]:
    """The selection record before any probe: what is compared, on what, and how."""
    return {
        "figure": FIGURE,
        "kinds": competing_kinds(config),
        "validation": {
            "source": "held-out normal training images and synthetic defects made in them; "
            "no test image, label or mask was read",
            "images": data.validation.counts(),
            "defect_kinds": list(defect_kinds(config)),
        },
        "budget_minutes": config.selection.budget_minutes,
        "probe_epochs": config.selection.probe_epochs,
    }


def _reuse(winner: probes.Probe, final: ml_collections.ConfigDict, workdir: str) -> bool:
    """Write the winner's probe state as the first checkpoint of its full run."""
    if winner.state is None:  # nothing kept to continue from
        return False
    ckpt = checkpointing.Checkpoints(workdir, final.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
        ckpt.close()
        return False
    state = winner.state
    step = int(state.step)
    spe = winner.record["steps_per_epoch"]
    meta = {
        "step": step,
        "epoch": step / spe,
        "steps_per_epoch": spe,
        "final": False,
        "from_selection": winner.candidate.name,
    }
    ckpt.save(step, state, winner.backbone, final, meta)
    ckpt.close()
    # The probe's training log is the start of the run's log.
    if jax.process_index() == 0:
        with open(winner.log_path, encoding="utf-8") as src:
            lines = src.read()
        with open(os.path.join(workdir, METRICS_LOG), "w", encoding="utf-8") as dst:
            dst.write(lines)
    return True


def _write(workdir: str, record: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, run_folder.SELECTION_FILE)
    atomic_write_json(path, record, indent=1, default=float)


def table(record: dict[str, Any]) -> str:
    """The (recipe, kind) table as plain text: one row per pair."""
    rows = [
        f"{'candidate':<18} {'kind':<9} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} "
        f"{'figure':>7} {'s/epoch':>8} {'epochs':>6}  note"
    ]
    for c in record["candidates"]:
        recipe_note = ""
        if not c.get("fits_budget", True):
            recipe_note = "cannot train long enough within the budget"
        if c.get("stopped_early"):
            recipe_note = f"{recipe_note}; " if recipe_note else ""
            recipe_note += f"probe stopped after {c['probe_epochs']} epoch(s) (budget)"
        for kind, f in kind_figures(c).items():
            won = c["name"] == record["winner"] and kind == record.get("winner_kind", kind)
            note = "; ".join(n for n in ("winner" if won else "", recipe_note) if n)
            rows.append(
                f"{c['name']:<18} {kind:<9} {f['image_auroc']:>11.4f} {f['pixel_auroc']:>11.4f} "
                f"{f['pixel_aupro']:>7.4f} {f['figure']:>7.4f} {c['seconds_per_epoch']:>8.1f} "
                f"{c.get('affordable_epochs', '-'):>6}  {note}"
            )
    for s in record.get("skipped", []):
        rows.append(
            f"{s['name']:<18} {'-':<9} {'-':>11} {'-':>11} {'-':>7} {'-':>7} {'-':>8} {'-':>6}"
            "  skipped"
        )
    return "\n".join(rows)


def select_and_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Selection (or the finished one of `workdir`), then the winner's full run and evaluation;
    metrics.json and the report record the candidates and the choice."""
    sharding.maybe_initialize_distributed()
    config = config.copy_and_resolve_references()
    validate_config(config)
    validate_selection_config(config)
    record = run_folder.read_selection(workdir)
    if record is None:
        record = select(config, workdir)
    else:
        log.info("selection: reusing the finished selection in %s", workdir)
    final = budget.final_config(config, record)
    print(table(record))
    summary = run_folder.selection_summary(record)
    return loop.train_and_evaluate(final, workdir, extra_info={"selection": summary})
