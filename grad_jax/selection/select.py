"""Label-free recipe selection: `--config.select=auto` (or a list of candidates).

A new dataset brings only normal training images we may learn from; its test defects must not
guide any choice. So the choice is made on a validation set built from normal TRAINING images
alone:

1. The held-out normal images (`threshold.holdout_fraction` of the training images, never
   trained on; the same ones later set the decision threshold) each appear once as they are
   (normal) and `selection.defects_per_image` times with a synthetic defect with an exact mask
   (`synthetic_defects`: patches cut from other training images, noise blobs, scratches,
   brightness holes).
2. Every candidate recipe (backbone, input size, backbone stages) trains briefly
   (`selection.probe_epochs`) on exactly the images the final run will train on, from backbone
   features cached once per (backbone, size, stages), and is scored on that validation set at a
   few epochs: the figure is the mean of image AUROC and pixel AUPRO.
3. With `selection.budget_minutes` (the whole run), probes stop at `selection.max_share` of it;
   a candidate competes if its full run can train at least 80% of the epochs the config's own
   recipe could (that one always competes; epoch times come from the fastest measured rate
   per unit of head cost, since the load of a shared machine changes between probes), and the
   winner trains the epochs that fit (at most `train.epochs`, the learning-rate step moved in
   proportion). The best figure wins, ties going
   to the earlier candidate. Its probe state is exactly the first `probe_epochs` of its full run
   (same images, order, seeds and learning-rate schedule), so it is written as that run's first
   checkpoint and training continues from it.

Only `<root>/train/good` is read before the final evaluation (`synthetic_validation` lists and
decodes it directly), never the dataset build, which also reads the test split.

The candidates, their validation figures, times and the choice go to `<workdir>/selection.json`
(written as soon as the winner is known: a rerun goes straight back to the final training), into
`metrics.json` under "selection", and into the report.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from grad_jax.config import AUTO_SIZE, tiling_on, validate_config
from grad_jax.data import input_pipeline
from grad_jax.devices import sharding
from grad_jax.errors import SelectionError
from grad_jax.files import atomic_write_json
from grad_jax.inference import device_program
from grad_jax.models.efficientnet import VARIANTS, efficientnet_spec
from grad_jax.models.model import ModelVariables
from grad_jax.runs import checkpointing, run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.selection.validation import (
    FIGURE,
    TrainFolder,
    ValidationSet,
    build_validation,
    category_roots,
    validate,
)
from grad_jax.training import feature_cache, loop
from grad_jax.training.optim import make_optimizer
from grad_jax.training.run_records import METRICS_LOG, MetricsLog

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"

_CANDIDATE = re.compile(r"^(?:efficientnet-)?(lite\d|b\d)@(\d+)(?:x(\d+))?(?::(\d(?:-\d)*))?$")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A recipe: what the full run changes in the config."""

    backbone: str
    image_size: tuple[int, int]
    out_layers: tuple[int, ...]

    @property
    def name(self) -> str:
        h, w = self.image_size
        size = f"{h}" if h == w else f"{h}x{w}"
        short = self.backbone.replace("efficientnet-", "")
        return f"{short}@{size}:{'-'.join(map(str, self.out_layers))}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9-]+", "_", self.name)

    def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        out = config.copy_and_resolve_references()
        out.model.backbone = self.backbone
        out.data.image_size = tuple(self.image_size)
        out.model.out_layers = tuple(self.out_layers)
        return out

    def cost(self, config: ml_collections.ConfigDict) -> float:
        """Relative head training cost: feature positions x backbone channels."""
        spec = efficientnet_spec(self.backbone)
        ends = spec.layer_blocks()
        channels = sum(spec.blocks[ends[layer]].out_ch for layer in self.out_layers)
        stride = config.model.out_stride
        return (self.image_size[0] // stride) * (self.image_size[1] // stride) * channels


def parse_candidate(text: str, default_layers: Sequence[int]) -> Candidate:
    """'lite1@256', 'lite0@288x224:3-4', 'efficientnet-b0@224' -> Candidate."""
    match = _CANDIDATE.match(text.strip())
    if not match:
        raise SelectionError(
            f"config.select: cannot read candidate {text!r}; write BACKBONE@SIZE[xWIDTH][:STAGES],"
            " e.g. lite1@224 or lite0@288x224:3-4"
        )
    short, h, w, stages = match.groups()
    backbone = f"efficientnet-{short}"
    if backbone not in VARIANTS:
        raise SelectionError(f"config.select: unknown backbone in {text!r}")
    layers = tuple(int(s) for s in stages.split("-")) if stages else tuple(default_layers)
    return Candidate(backbone, (int(h), int(w or h)), layers)


def base_candidate(config: ml_collections.ConfigDict) -> Candidate:
    """The config's own recipe (always a candidate)."""
    return Candidate(
        config.model.backbone, tuple(config.data.image_size), tuple(config.model.out_layers)
    )


def candidates(config: ml_collections.ConfigDict) -> list[Candidate]:
    """The config's own recipe first, then those of `config.select` ('auto': the default set)."""
    spec = config.select.strip()
    if spec == "auto":
        spec = config.selection.candidates
    base = base_candidate(config)
    out = [base]
    for text in spec.split(","):
        if text.strip():
            c = parse_candidate(text, base.out_layers)
            if c not in out:
                out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Probing a candidate
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    """What probing one candidate gave."""

    candidate: Candidate
    record: dict[str, Any]
    state: TrainState | None = None  # host copy of the training state after the probe
    backbone: dict[str, Any] | None = None
    log_path: str = ""


class FeatureCache:
    """Backbone features of the training images, one entry per (backbone, size, stages)."""

    def __init__(self):
        self.entries: dict[tuple, tuple[list[np.ndarray], list[str | None]]] = {}

    def get(self, candidate, variables, source, config, mesh, backbone):
        key = (candidate.backbone, candidate.image_size, candidate.out_layers)
        if key not in self.entries:
            shapes = feature_cache.feature_shapes(variables, config)
            extract = feature_cache.make_extract_fn(variables, mesh)
            self.entries[key] = feature_cache.build_feature_cache(
                extract, backbone, source, config, mesh, shapes
            )
        return self.entries[key]


def _probe_epoch(run: loop.TrainingRun, state, step_fn, epoch: int, cache, label: str):
    """One training epoch of a probe; returns (state, steps taken)."""
    config = run.config
    bar = tqdm.tqdm(
        total=run.steps_per_epoch,
        desc=f"{label} epoch {epoch + 1}/{config.train.epochs}",
        disable=jax.process_index() != 0,
        leave=False,
    )
    pending, steps = None, epoch * run.steps_per_epoch
    for local in loop.epoch_batches(run.source, epoch, 0, config, cache):
        inputs = sharding.global_batch(loop.step_inputs(local), run.mesh)
        state, step_metrics = step_fn(state, run.backbone, inputs)
        if pending is not None:
            run.record_step(pending)
        steps += 1
        pending = (steps, step_metrics, local["filename"], 0.0)
        bar.update(1)
    bar.close()
    if pending is not None:
        run.record_step(pending)
    return state


def _start_probe(candidate, cfg, source, cache: FeatureCache, log_dir: str):
    """(run, state, feature cache or None, caching seconds) of a probe at step 0."""
    n = len(source)
    spe = input_pipeline.steps_per_epoch(n, cfg.train.batch_size, jax.device_count())
    variables = ModelVariables.from_model(run_folder.create_model(cfg))
    tx, schedules = make_optimizer(cfg.train, spe, variables.params)
    mesh = sharding.make_mesh()
    state = sharding.replicate(TrainState.create(variables.params, variables.batch_stats, tx), mesh)
    backbone = sharding.replicate(variables.backbone, mesh)
    os.makedirs(log_dir, exist_ok=True)
    run = loop.TrainingRun(
        cfg, variables, tx, schedules, mesh, backbone, source, spe, None, {},
        MetricsLog(log_dir, 0),
    )  # fmt: skip
    t_cache = time.time()
    features = None
    if feature_cache.use_cache(cfg, feature_cache.feature_shapes(variables, cfg), n):
        features = cache.get(candidate, variables, source, cfg, mesh, backbone)
    return run, state, features, time.time() - t_cache


def probe(
    candidate: Candidate,
    config: ml_collections.ConfigDict,
    source: input_pipeline.IndexedSource,
    val: ValidationSet,
    cache: FeatureCache,
    log_dir: str,
) -> Probe:
    """Train `candidate` for `selection.probe_epochs` exactly as its full run would start, and
    score it on `val` after each epoch of `selection.eval_epochs` (and the last)."""
    cfg = candidate.apply(config)
    probe_epochs = config.selection.probe_epochs
    cfg.train.epochs = probe_epochs
    validate_config(cfg)
    t_start = time.time()
    run, state, features, t_cache = _start_probe(candidate, cfg, source, cache, log_dir)
    step_fn = loop.make_train_step(run.variables, run.tx, run.mesh, features is not None, cfg.seed)
    eval_epochs = sorted({e for e in config.selection.eval_epochs if 0 < e < probe_epochs})
    eval_epochs.append(probe_epochs)
    curve = []
    train_seconds = val_seconds = 0.0
    for epoch in range(probe_epochs):
        t0 = time.time()
        state = _probe_epoch(run, state, step_fn, epoch, features, candidate.name)
        train_seconds += time.time() - t0
        if epoch + 1 in eval_epochs:
            variables = run.variables.replace(
                backbone=run.backbone, params=state.params, batch_stats=state.batch_stats
            )
            predict = device_program.make_predict_fn(variables, cfg, run.mesh)
            t0 = time.time()
            figures = validate(predict, val, cfg)
            val_seconds = time.time() - t0
            curve.append({"epoch": epoch + 1, **figures})
            log.info(
                "selection %s epoch %d: image AUROC %.4f pixel AUROC %.4f AUPRO %.4f",
                candidate.name, epoch + 1, figures["image_auroc"], figures["pixel_auroc"],
                figures["pixel_aupro"],
            )  # fmt: skip
    record = {
        "name": candidate.name,
        "backbone": candidate.backbone,
        "image_size": list(candidate.image_size),
        "out_layers": list(candidate.out_layers),
        "probe_epochs": probe_epochs,
        "curve": curve,
        **{k: curve[-1][k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")},
        "seconds_per_epoch": train_seconds / probe_epochs,
        "cache_seconds": t_cache,
        "val_seconds": val_seconds,
        "seconds": time.time() - t_start,
        "steps_per_epoch": run.steps_per_epoch,
    }
    return Probe(
        candidate, record, jax.device_get(state), jax.device_get(run.backbone),
        run.metrics_log.path,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


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
    if problems:
        raise SelectionError("invalid selection config:\n  " + "\n  ".join(problems))


def _overhead_seconds(record: dict[str, Any]) -> float:
    """Time of a full run besides its epochs: caching the features again, the threshold and the
    test evaluation (taken as the probe's caching plus two epochs and three validations)."""
    per_epoch = record.get("seconds_per_epoch_estimate", record["seconds_per_epoch"])
    return record["cache_seconds"] + 2 * per_epoch + 3 * record["val_seconds"]


def affordable_epochs(record: dict[str, Any], config, seconds_left: float) -> int:
    """How many epochs of a candidate's full run fit in `seconds_left` (the configured number at
    most); the probe's epochs are already trained and continue."""
    per_epoch = max(record.get("seconds_per_epoch_estimate", record["seconds_per_epoch"]), 1e-9)
    more = int((seconds_left - _overhead_seconds(record)) // per_epoch)
    # Never fewer than the probe's own epochs: with no time left the probe is the model.
    return int(min(config.train.epochs, record["probe_epochs"] + max(more, 0)))


def final_config(
    config: ml_collections.ConfigDict, record: dict[str, Any]
) -> ml_collections.ConfigDict:
    """The winner's full-run config: its recipe, and the epochs the budget allows (the learning
    rate step moved in proportion, so the schedule keeps its shape)."""
    chosen = next(c for c in record["candidates"] if c["name"] == record["winner"])
    cand = Candidate(chosen["backbone"], tuple(chosen["image_size"]), tuple(chosen["out_layers"]))
    final = cand.apply(config)
    final.train.epochs = record["final_epochs"]
    final.train.lr_step_epochs = record["final_lr_step_epochs"]
    return final


@dataclasses.dataclass
class _SelectionData:
    """The training images (never a test file) and the synthetic validation made from them."""

    config: ml_collections.ConfigDict  # with data.image_size resolved
    folders: list[TrainFolder]
    names: list[str]
    train_items: list[input_pipeline.Item]
    validation: ValidationSet


def _selection_data(config: ml_collections.ConfigDict) -> _SelectionData:
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
        folders, names, train_items, held_items, config.selection.defects_per_image, config.seed
    )
    log.info("selection: synthetic validation %s", val.counts())
    return _SelectionData(config, folders, names, train_items, val)


def _probe_all(data: _SelectionData, workdir: str, record: dict[str, Any], started: float):
    """(probes, skipped): every candidate probed while the budget's probing share allows;
    selection.json is rewritten after each probe."""
    config = data.config
    budget = config.selection.budget_minutes * 60.0
    cache = FeatureCache()
    pool = candidates(config)
    probes: list[Probe] = []
    skipped: list[dict[str, Any]] = []
    base_cost = pool[0].cost(config)
    for k, cand in enumerate(pool):
        if k > 0 and budget > 0:
            probe_estimate = probes[0].record["seconds"] * cand.cost(config) / base_cost
            elapsed = time.time() - started
            # Probing may use at most selection.max_share of the budget; the rest trains the
            # winner.
            limit = config.selection.max_share * budget
            if elapsed + probe_estimate > limit:
                skipped.append(
                    {
                        "name": cand.name,
                        "reason": f"over budget: probing would take about {probe_estimate:.0f} s"
                        f" more after {elapsed:.0f} s, past the {limit:.0f} s that probes may use",
                    }
                )
                log.info("selection: %s skipped (%s)", cand.name, skipped[-1]["reason"])
                continue
        source = input_pipeline.IndexedSource(
            data.folders, data.train_items, cand.image_size, data.names, masks=False
        )
        log_dir = os.path.join(workdir, "selection", cand.slug)
        probes.append(probe(cand, config, source, data.validation, cache, log_dir))
        _write(workdir, {**record, "candidates": [p.record for p in probes], "skipped": skipped})
    return probes, skipped


def _choose(probes: list[Probe], config: ml_collections.ConfigDict, seconds_left: float) -> Probe:
    """The winner among the candidates that can train long enough; adds each one's epoch
    estimate, affordable epochs and eligibility to its record."""
    budget = config.selection.budget_minutes * 60.0
    # On a shared machine the load changes between probes, so each candidate's epoch time is
    # estimated from the fastest measured rate per unit of head cost (positions x channels).
    rate = min(p.record["seconds_per_epoch"] / p.candidate.cost(config) for p in probes)
    for p in probes:
        p.record["seconds_per_epoch_estimate"] = rate * p.candidate.cost(config)
        p.record["affordable_epochs"] = (
            affordable_epochs(p.record, config, seconds_left) if budget > 0 else config.train.epochs
        )
    # A candidate competes only if the budget lets it train (nearly) as long as the config's own
    # recipe could; that one always competes, if need be with fewer epochs than configured.
    floor = 0.8 * probes[0].record["affordable_epochs"]
    for i, p in enumerate(probes):
        p.record["fits_budget"] = i == 0 or p.record["affordable_epochs"] >= floor
    eligible = [p for p in probes if p.record["fits_budget"]]
    # Ties go to the earlier candidate, i.e. to the config's own recipe first.
    return max(eligible, key=lambda p: (p.record["figure"], -probes.index(p)))


def select(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Probe every candidate, choose one, and prepare `workdir` for its full run.

    Returns the selection record (also written to `<workdir>/selection.json`), whose "config"
    holds the winner's full config as JSON.
    """
    started = time.time()
    data = _selection_data(config)
    config = data.config
    record: dict[str, Any] = {
        "figure": FIGURE,
        "validation": {
            "source": "held-out normal training images and synthetic defects made in them; "
            "no test image, label or mask was read",
            "images": data.validation.counts(),
        },
        "budget_minutes": config.selection.budget_minutes,
        "probe_epochs": config.selection.probe_epochs,
    }
    probes, skipped = _probe_all(data, workdir, record, started)
    elapsed = time.time() - started
    winner = _choose(probes, config, config.selection.budget_minutes * 60.0 - elapsed)
    epochs = max(winner.record["affordable_epochs"], 1)
    lr_step = config.train.lr_step_epochs
    if epochs < config.train.epochs:
        lr_step = max(1, round(lr_step * epochs / config.train.epochs))
        log.info("selection: the budget allows %d of %d epochs", epochs, config.train.epochs)
    record.update(
        candidates=[p.record for p in probes],
        skipped=skipped,
        winner=winner.candidate.name,
        selection_seconds=elapsed,
        final_epochs=epochs,
        final_lr_step_epochs=lr_step,
    )
    final = final_config(config, record)
    # The probe is the start of the full run if it did not reach a learning-rate step.
    reusable = config.selection.probe_epochs <= min(epochs, lr_step)
    record["config"] = json.loads(final.to_json_best_effort())
    # The choice is on disk before the checkpoint: a rerun after a crash in between then trains
    # the winner from the start instead of choosing again next to a stray checkpoint.
    record["reused_probe"] = False
    _write(workdir, record)
    if reusable and _reuse(winner, final, workdir):
        record["reused_probe"] = True
        _write(workdir, record)
    return record


def _reuse(winner: Probe, final: ml_collections.ConfigDict, workdir: str) -> bool:
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
    atomic_write_json(os.path.join(workdir, SELECTION_FILE), record, indent=1, default=float)


def read_selection(workdir: str) -> dict[str, Any] | None:
    """The finished selection of `workdir` (with a winner), or None."""
    path = os.path.join(workdir, SELECTION_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return record if "winner" in record else None


def table(record: dict[str, Any]) -> str:
    """The candidate table as plain text."""
    rows = [
        f"{'candidate':<18} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'figure':>7} "
        f"{'s/epoch':>8} {'epochs':>6}  note"
    ]
    for c in record["candidates"]:
        note = "winner" if c["name"] == record["winner"] else ""
        if not c.get("fits_budget", True):
            note = "cannot train long enough within the budget"
        rows.append(
            f"{c['name']:<18} {c['image_auroc']:>11.4f} {c['pixel_auroc']:>11.4f} "
            f"{c['pixel_aupro']:>7.4f} {c['figure']:>7.4f} {c['seconds_per_epoch']:>8.1f} "
            f"{c.get('affordable_epochs', '-'):>6}  {note}"
        )
    for s in record.get("skipped", []):
        rows.append(
            f"{s['name']:<18} {'-':>11} {'-':>11} {'-':>7} {'-':>7} {'-':>8} {'-':>6}  skipped"
        )
    return "\n".join(rows)


def _report_section(record: dict[str, Any]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("candidate", "epoch", "image AUROC", "pixel AUROC", "AUPRO", "figure", "s/epoch")
    )
    rows = []
    for c in record["candidates"]:
        for point in c["curve"]:
            mark = " (winner)" if c["name"] == record["winner"] else ""
            rows.append(
                f"<tr><td>{html.escape(c['name'])}{mark}</td><td>{point['epoch']}</td>"
                + "".join(
                    f"<td>{point[k]:.4f}</td>"
                    for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "figure")
                )
                + f"<td>{c['seconds_per_epoch']:.1f}</td></tr>"
            )
    skipped = "".join(
        f"<li>{html.escape(s['name'])}: {html.escape(s['reason'])}</li>"
        for s in record.get("skipped", [])
    )
    return (
        '<section id="selection"><h2>Recipe selection (label-free)</h2>'
        f"<p>Ranked by the {html.escape(record['figure'])}; validation: "
        f"{html.escape(record['validation']['source'])} "
        f"({html.escape(json.dumps(record['validation']['images']))}). Winner: "
        f"<b>{html.escape(record['winner'])}</b>"
        f"{' (its probe state continued)' if record.get('reused_probe') else ''}.</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
        + (f"<p>Skipped:</p><ul>{skipped}</ul>" if skipped else "")
        + "</section>"
    )


def _add_to_report(workdir: str, record: dict[str, Any]) -> None:
    path = os.path.join(workdir, "report", "index.html")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        page = f.read()
    section = _report_section(record)
    page = page.replace("</body>", section + "</body>") if "</body>" in page else page + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def select_and_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Selection (or the finished one of `workdir`), then the winner's full run and evaluation;
    metrics.json and the report record the candidates and the choice."""
    sharding.maybe_initialize_distributed()
    config = config.copy_and_resolve_references()
    validate_config(config)
    validate_selection_config(config)
    record = read_selection(workdir)
    if record is None:
        record = select(config, workdir)
    else:
        log.info("selection: reusing the finished selection in %s", workdir)
    final = final_config(config, record)
    print(table(record))
    summary = {k: v for k, v in record.items() if k != "config"}
    values = loop.train_and_evaluate(final, workdir, extra_info={"selection": summary})
    _add_to_report(workdir, record)
    return values
