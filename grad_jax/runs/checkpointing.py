"""Orbax checkpoints of a grad_jax run: the only module that knows Orbax and the item layout.

A checkpoint (`<workdir>/checkpoints/<step>/`) holds four items, and a fifth in the final one:
- `model`: trainable params and BN statistics (flat string-keyed dicts);
- `train`: the optimiser state and step counter (not needed for inference);
- `backbone`: the frozen backbone's variables, so a workdir is self-contained (evaluation and
  prediction need neither the original .pth file nor the internet);
- `meta`: JSON with the model fingerprint (everything that fixes a shape), the epoch, and the
  decision threshold once training has finished;
- `knn` (final checkpoint, when the baseline is on): the nearest-neighbour memory bank
  `[M, C]`; its shape is in `meta["knn"]["bank_shape"]`.

Orbax writes each step to a temporary folder and renames it when complete, so a process killed
mid-save never leaves a checkpoint that looks whole. A checkpoint that is nevertheless corrupt
(damaged on disk) is skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from grad_jax.errors import CheckpointMismatchError, RunFolderError
from grad_jax.models.model import ModelVariables
from grad_jax.runs.train_state import TrainState

log = logging.getLogger(__name__)

# Config fields that decide a variable's shape or meaning; a checkpoint must agree on all.
FINGERPRINT_FIELDS = (
    "model.backbone",
    "model.out_layers",
    "model.out_stride",
    "model.local_resol",
    "model.global_resol",
    "model.layers",
    "model.ch_exp",
    "data.image_size",
)

# Config fields that decide the training trajectory: a run resumes only with the same values
# (another batch, seed or length would silently train a different recipe).
RESUME_FIELDS = ("seed", "train.batch_size", "train.epochs")

ITEMS = ("model", "train", "backbone", "knn")


def _items(state: TrainState, backbone: Any) -> dict[str, Any]:
    """The on-disk items of a training state and its frozen backbone."""
    return {
        "model": {"params": state.params, "batch_stats": state.batch_stats},
        "train": {"step": state.step, "opt_state": state.opt_state},
        "backbone": backbone,
    }


def fingerprint(
    config: ml_collections.ConfigDict, fields: tuple[str, ...] = FINGERPRINT_FIELDS
) -> dict[str, Any]:
    """{field: value} of `config` for dotted `fields` (tuples as lists, as JSON has them)."""
    out = {}
    for field in fields:
        value: Any = config
        for part in field.split("."):
            value = value[part]
        out[field] = list(value) if isinstance(value, tuple | list) else value
    return out


def check_fingerprint(saved: dict[str, Any], config: ml_collections.ConfigDict, where: str):
    current = fingerprint(config)
    diffs = [
        f"{k}: checkpoint has {saved.get(k)!r}, config has {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} was written for another model configuration:\n  "
            + "\n  ".join(diffs)
            + "\nUse the config it was trained with, or a new --workdir for this one."
        )


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Refuse to continue a run whose trajectory settings (RESUME_FIELDS, the number of
    training images) differ; `saved` is None for checkpoints written before they were stored."""
    if saved is None:
        return
    diffs = [
        f"{k}: the run was started with {saved.get(k)!r}, the config has {v!r}"
        for k, v in current.items()
        if k in saved and saved[k] != v
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"cannot resume {where}: it was trained with other settings:\n  "
            + "\n  ".join(diffs)
            + "\nUse the run's own settings (its config.json) to continue it, or a new --workdir."
        )


class Checkpoints:
    """Save and restore the training state of one workdir."""

    def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
        """`read_only` (evaluation, prediction) never deletes or creates anything, so it is safe
        beside a training process that may be in the middle of a save."""
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max(1, keep)),
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEMS + ("meta",)
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        state: TrainState,
        backbone: Any,
        config: ml_collections.ConfigDict,
        meta: dict[str, Any],
        bank: Any = None,
    ) -> None:
        """Save `state`, the `backbone` variables, `meta` (plus the model fingerprint of
        `config`) and the kNN memory `bank` if any as checkpoint `step`."""
        meta = {"fingerprint": fingerprint(config), **meta}
        items = _items(state, backbone)
        if bank is not None:
            items["knn"] = {"bank": bank}
            meta["knn"] = {**meta.get("knn", {}), "bank_shape": list(bank.shape)}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self.manager.save(
            step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True
        )
        self.manager.wait_until_finished()

    def delete(self, step: int) -> None:
        self.manager.delete(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_training(
        self, state: TrainState, backbone: Any, config: ml_collections.ConfigDict
    ) -> tuple[int, TrainState, Any, dict[str, Any]]:
        """(step, state, backbone, meta) of the newest readable checkpoint; `state` and
        `backbone` give the structure (concrete or abstract arrays, with shardings)."""
        step, items, meta = self._restore(_items(state, backbone), config)
        model, train = items["model"], items["train"]
        restored = TrainState(
            train["step"], model["params"], model["batch_stats"], train["opt_state"]
        )
        return step, restored, items["backbone"], meta

    def restore_model(
        self,
        variables: ModelVariables,
        config: ml_collections.ConfigDict,
        step: int | None = None,
    ) -> tuple[int, ModelVariables, dict[str, Any]]:
        """(step, variables, meta) for inference: the trained params, BN statistics and backbone
        of checkpoint `step` (default: the newest readable one) in `variables`' structure."""
        templates = {
            "model": {"params": variables.params, "batch_stats": variables.batch_stats},
            "backbone": variables.backbone,
        }
        step, items, meta = self._restore(templates, config, step, with_bank=True)
        restored = variables.replace(
            backbone=items["backbone"],
            params=items["model"]["params"],
            batch_stats=items["model"]["batch_stats"],
            bank=items.get("knn", {}).get("bank"),
        )
        return step, restored, meta

    def restore_bank(self, step: int) -> Any:
        """The kNN memory bank of checkpoint `step`, or None when it has none."""
        shape = (self.read_meta(step).get("knn") or {}).get("bank_shape")
        if not shape:
            return None
        template = {"bank": jax.ShapeDtypeStruct(tuple(shape), jax.numpy.float32)}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(knn=ocp.args.StandardRestore(template))
        )
        return restored["knn"]["bank"]

    def _restore(
        self,
        templates: dict[str, Any],
        config: ml_collections.ConfigDict,
        step: int | None = None,
        with_bank: bool = False,
    ) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """(step, items, meta) of `step`, or of the newest readable checkpoint.

        `templates` names the items to read (a subset of ITEMS) with concrete or abstract
        (`jax.ShapeDtypeStruct`, with shardings) pytrees of the expected structure;
        `with_bank` also reads the kNN memory bank where the checkpoint's meta says it has one.
        """
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            raise RunFolderError(f"no checkpoint in {self.directory}")
        abstract = {
            name: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
            for name, tree in templates.items()
        }
        errors = []
        for s in steps:
            where = os.path.join(self.directory, str(s))
            try:
                meta = self.read_meta(s)
            except Exception as err:  # noqa: BLE001 - any damage means: try the previous one
                errors.append(f"step {s}: {type(err).__name__}: {err}")
                log.warning("checkpoint %s is unreadable (%s); trying an older one", where, err)
                continue
            check_fingerprint(meta.get("fingerprint", {}), config, where)
            wanted = dict(abstract)
            shape = (meta.get("knn") or {}).get("bank_shape")
            if with_bank and shape:
                wanted["knn"] = {"bank": jax.ShapeDtypeStruct(tuple(shape), jax.numpy.float32)}
            try:
                restored = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        **{k: ocp.args.StandardRestore(v) for k, v in wanted.items()}
                    ),
                )
                items = {k: restored[k] for k in wanted}
            except Exception as err:  # noqa: BLE001
                errors.append(f"step {s}: {type(err).__name__}: {err}")
                log.warning("checkpoint %s is damaged (%s); trying an older one", where, err)
                continue
            if errors:
                log.warning("restored step %d after skipping: %s", s, "; ".join(errors))
            return s, items, meta
        raise RuntimeError(f"no readable checkpoint in {self.directory}:\n  " + "\n  ".join(errors))

    def close(self) -> None:
        self.manager.close()
