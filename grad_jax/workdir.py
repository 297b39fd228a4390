"""A run's folder: its config, its model variables, and loading a trained model for inference.

<workdir>/config.json      the full config of the run (written when training starts)
<workdir>/checkpoints/     Orbax checkpoints (see checkpointing.py)
<workdir>/metrics.jsonl    one line per logged training step
<workdir>/metrics.json     evaluation of the final model
<workdir>/report/          the visual report
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from grad_jax import checkpointing, convert
from grad_jax.models.model import GradModel, build_model, from_flat, merge, split_model, to_flat

CONFIG_FILE = "config.json"


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
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


def create_model(config: ml_collections.ConfigDict) -> GradModel:
    """A model with the configured pretrained backbone (or a random one if asked explicitly)."""
    model = build_model(config, seed=config.seed)
    if not config.model.random_backbone:
        convert.load_backbone(model, config.model.backbone, config.model.backbone_weights)
    return model


@dataclasses.dataclass
class ModelVariables:
    """A model as a graph definition plus flat variable dicts (the functional boundary)."""

    graphdef: Any
    templates: tuple[Any, Any, Any]  # nnx.State of backbone, params, batch stats
    backbone: dict[str, jax.Array]
    params: dict[str, jax.Array]
    batch_stats: dict[str, jax.Array]

    @classmethod
    def from_model(cls, model: GradModel) -> ModelVariables:
        graphdef, backbone, params, stats = split_model(model)
        return cls(
            graphdef, (backbone, params, stats), to_flat(backbone), to_flat(params), to_flat(stats)
        )

    def merge(self, backbone=None, params=None, batch_stats=None) -> GradModel:
        """A module from flat dicts (defaults: the stored ones); usable inside jit."""
        tb, tp, ts = self.templates
        return merge(
            self.graphdef,
            from_flat(tb, self.backbone if backbone is None else backbone),
            from_flat(tp, self.params if params is None else params),
            from_flat(ts, self.batch_stats if batch_stats is None else batch_stats),
        )


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
    fingerprint is checked against it.
    """
    config = read_config(workdir) if config is None else config.copy_and_resolve_references()
    config.model.random_backbone = True  # the checkpoint holds the backbone
    variables = ModelVariables.from_model(build_model(config, seed=config.seed))
    ckpt = checkpointing.Checkpoints(workdir, read_only=True)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"{ckpt.directory} holds no checkpoint yet: train first, or wait for the first save"
        )
    templates = {
        "model": {"params": variables.params, "batch_stats": variables.batch_stats},
        "backbone": variables.backbone,
    }
    step, items, meta = ckpt.restore(templates, config, step)
    ckpt.close()
    variables.params = items["model"]["params"]
    variables.batch_stats = items["model"]["batch_stats"]
    variables.backbone = items["backbone"]
    return TrainedModel(config, variables, step, meta)
