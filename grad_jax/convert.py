"""`python -m grad_jax.convert`: PyTorch checkpoints -> a grad_jax run folder or backbone file.

The layouts themselves (key maps, transforms, file reading) are in `grad_jax.weights.state_dicts`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from grad_jax import cli
from grad_jax.errors import ConversionError, UsageError
from grad_jax.files import atomic_write
from grad_jax.models.model import ModelVariables, build_model
from grad_jax.runs import checkpointing, run_folder
from grad_jax.runs.train_state import TrainState
from grad_jax.training.optim import make_optimizer
from grad_jax.weights import state_dicts

USAGE = """\
usage:
python -m grad_jax.convert --torch-checkpoint=ckpt_best.pth.tar --config=configs/unified.py \\
    --workdir=DIR
    An official CRAD checkpoint -> a grad_jax run folder (evaluate with
    `python -m grad_jax.main --mode=eval --config=... --workdir=DIR`, or predict with
    `python -m grad_jax.predict --workdir=DIR ...`).
python -m grad_jax.convert --torch-backbone=efficientnet-b4-6ed6700e.pth \\
    --config=configs/unified.py --out=backbone.npz
    A lukemelas EfficientNet .pth -> backbone variables (.npz, usable as
    config.model.backbone_weights).
"""


def convert_crad_checkpoint(checkpoint: str, config, workdir: str) -> dict[str, Any]:
    """Write `workdir` (config.json + an Orbax checkpoint) from an official CRAD checkpoint."""
    config = config.copy_and_resolve_references()
    config.model.kind = "grad"  # an official checkpoint is a GRAD model: it holds no kNN bank
    model = build_model(config, seed=config.seed)  # the backbone comes from the checkpoint
    meta = state_dicts.load_crad_checkpoint(model, checkpoint)
    variables = ModelVariables.from_model(model)
    tx, _ = make_optimizer(config.train, 1, variables.params)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpointing.Checkpoints(workdir)
    if ckpt.latest_step() is not None:
        raise ConversionError(f"{workdir} already holds checkpoints; choose an empty --workdir")
    run_folder.write_config(config, workdir)
    record = {
        "step": 0,
        "final": True,
        "threshold": None,
        "converted_from": os.path.basename(checkpoint),
        "source_metadata": meta,
    }
    state = TrainState.create(variables.params, variables.batch_stats, tx)
    ckpt.save(0, state, variables.backbone, config, record)
    ckpt.close()
    return record


def convert_backbone_file(weights_file: str, config, out: str) -> int:
    """Check a lukemelas .pth against the configured backbone and save the tensors it uses as
    .npz, under their original names (so the file reads back like the .pth it came from)."""
    model = build_model(config, seed=config.seed)
    state_dict = state_dicts.read_state_dict(weights_file)
    pairs = list(state_dicts.backbone_pairs(model.backbone))
    state_dicts.apply_pairs(model.backbone, iter(pairs), state_dict, weights_file)
    arrays = {key: np.asarray(state_dict[key], np.float32) for _, key, _ in pairs}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out, write)
    return len(arrays)


def define_flags(values: flags.FlagValues) -> None:
    """The flags of `python -m grad_jax.convert` (--config comes with `cli.run_command`)."""
    flags.DEFINE_string(
        "torch-checkpoint", None, "Official CRAD training checkpoint.", flag_values=values
    )
    flags.DEFINE_string("torch-backbone", None, "lukemelas EfficientNet .pth.", flag_values=values)
    flags.DEFINE_string(
        "workdir", None, "Output run folder (with --torch-checkpoint).", flag_values=values
    )
    flags.DEFINE_string("out", None, "Output .npz (with --torch-backbone).", flag_values=values)


def convert_command(values: flags.FlagValues, args: list[str]) -> int:
    """Check the flags, convert the one file given, and print what was written."""
    checkpoint, backbone = values["torch-checkpoint"].value, values["torch-backbone"].value
    if values.config is None:
        raise UsageError("--config is required (e.g. --config=configs/unified.py)")
    if bool(checkpoint) == bool(backbone):
        raise UsageError("give exactly one of --torch-checkpoint or --torch-backbone")
    if checkpoint:
        if not values.workdir:
            raise UsageError("--torch-checkpoint needs --workdir")
        record = convert_crad_checkpoint(checkpoint, values.config, values.workdir)
        print(
            f"converted {checkpoint} -> {values.workdir} "
            f"(source epoch {record['source_metadata'].get('epoch', '?')})"
        )
    else:
        if not values.out:
            raise UsageError("--torch-backbone needs --out")
        n = convert_backbone_file(backbone, values.config, values.out)
        print(f"converted {backbone} -> {values.out} ({n} tensors)")
    sys.stdout.flush()
    return cli.EXIT_OK


def main(argv: Sequence[str]) -> int:
    """The command line (`argv[0]` is the program name); returns the exit status."""
    return cli.run_command(argv, USAGE, define_flags, convert_command, config=cli.REQUIRED)


def run() -> None:
    """Console-script entry point (`grad-jax-convert`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
