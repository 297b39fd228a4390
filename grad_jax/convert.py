"""`python -m grad_jax.convert`: PyTorch checkpoints -> a grad_jax run folder or backbone file.

The layouts themselves (key maps, transforms, file reading) are in `grad_jax.weights`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from grad_jax import checkpointing, cli, run_folder, weights
from grad_jax.config import load_config_file
from grad_jax.errors import ConversionError
from grad_jax.files import atomic_write
from grad_jax.models.model import ModelVariables, build_model
from grad_jax.optim import make_optimizer
from grad_jax.train_state import TrainState

USAGE = """\
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
    model = build_model(config, seed=config.seed)  # the backbone comes from the checkpoint
    meta = weights.load_crad_checkpoint(model, checkpoint)
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
    state_dict = weights.read_state_dict(weights_file)
    pairs = list(weights.backbone_pairs(model.backbone))
    weights.apply_pairs(model.backbone, iter(pairs), state_dict, weights_file)
    arrays = {key: np.asarray(state_dict[key], np.float32) for _, key, _ in pairs}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out, write)
    return len(arrays)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m grad_jax.convert",
        usage=USAGE,
        description="Convert PyTorch checkpoints to grad_jax.",
    )
    parser.add_argument("--torch-checkpoint", help="official CRAD training checkpoint")
    parser.add_argument("--torch-backbone", help="lukemelas EfficientNet .pth")
    parser.add_argument("--config", required=True, help="config file, e.g. configs/unified.py")
    parser.add_argument("--workdir", help="output run folder (with --torch-checkpoint)")
    parser.add_argument("--out", help="output .npz (with --torch-backbone)")
    args = parser.parse_args(argv)
    if bool(args.torch_checkpoint) == bool(args.torch_backbone):
        parser.error("give exactly one of --torch-checkpoint or --torch-backbone")
    cli.configure_logging()
    with cli.friendly_errors():
        config = load_config_file(args.config)
        if args.torch_checkpoint:
            if not args.workdir:
                parser.error("--torch-checkpoint needs --workdir")
            record = convert_crad_checkpoint(args.torch_checkpoint, config, args.workdir)
            print(
                f"converted {args.torch_checkpoint} -> {args.workdir} "
                f"(source epoch {record['source_metadata'].get('epoch', '?')})"
            )
        else:
            if not args.out:
                parser.error("--torch-backbone needs --out")
            n = convert_backbone_file(args.torch_backbone, config, args.out)
            print(f"converted {args.torch_backbone} -> {args.out} ({n} tensors)")
    sys.stdout.flush()
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
