"""A run folder: its config file, and the models it holds (new for training, trained for
inference).

<workdir>/config.json      the full config of the run (written when training starts)
<workdir>/checkpoints/     Orbax checkpoints (see checkpointing.py)
<workdir>/metrics.jsonl    one line per logged training step
<workdir>/metrics.json     evaluation of the final model
<workdir>/report/          the visual report
<workdir>/selection.json   the recipe selection, when the run chose its recipe (written by
                           grad_jax.selection; read here, so evaluation can report it)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from grad_jax.errors import RunFolderError
from grad_jax.files import atomic_write_text
from grad_jax.models.model import GradModel, ModelVariables, build_model
from grad_jax.runs import checkpointing
from grad_jax.weights import state_dicts

CONFIG_FILE = "config.json"
SELECTION_FILE = "selection.json"


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_text(
        os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=1, sort_keys=True)
    )


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunFolderError(
            f"{path} not found: {workdir} is not a grad_jax run folder (train one with "
            "python -m grad_jax.main --config=... --workdir=DIR, or convert an official CRAD "
            "checkpoint with python -m grad_jax.convert)"
        )
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)

    def tuples(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    return ml_collections.ConfigDict(tuples(raw))


def read_selection(workdir: str) -> dict[str, Any] | None:
    """The finished recipe selection of `workdir` (its `selection.json`, once it names a
    winner), or None."""
    path = os.path.join(workdir, SELECTION_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return record if "winner" in record else None


def selection_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json and the report show of a selection record: all of it but the winner's
    full "config" (which is the run's config.json)."""
    return {k: v for k, v in record.items() if k != "config"}


def create_model(config: ml_collections.ConfigDict) -> GradModel:
    """A model with the configured pretrained backbone (or a random one if asked explicitly)."""
    model = build_model(config, seed=config.seed)
    if not config.model.random_backbone:
        state_dicts.load_backbone(model, config.model.backbone, config.model.backbone_weights)
    return model


@dataclasses.dataclass
class TrainedModel:
    config: ml_collections.ConfigDict
    variables: ModelVariables
    step: int
    meta: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        th = self.meta.get("threshold") or {}
        return th.get("image_score")


def load_trained(
    workdir: str, step: int | None = None, config: ml_collections.ConfigDict | None = None
) -> TrainedModel:
    """The model of a run folder (latest readable checkpoint, or `step`), for inference.

    `config` (default: the run's config.json) must describe the same model; the checkpoint's
    fingerprint is checked against it. Read-only: safe beside a training job that is saving.
    """
    config = read_config(workdir) if config is None else config.copy_and_resolve_references()
    # Random weights: the checkpoint holds the backbone.
    variables = ModelVariables.from_model(build_model(config, seed=config.seed))
    ckpt = checkpointing.Checkpoints(workdir, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise RunFolderError(
                f"{ckpt.directory} holds no checkpoint yet: train first, or wait for the first save"
            )
        if step is not None and int(step) not in steps:
            have = ", ".join(map(str, steps))
            raise RunFolderError(
                f"{workdir} has no checkpoint of step {step} (available steps: {have})"
            )
        step, variables, meta = ckpt.restore_model(variables, config, step)
    finally:
        ckpt.close()
    return TrainedModel(config, variables, step, meta)
