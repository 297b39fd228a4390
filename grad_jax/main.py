"""Command-line entry point: `python -m grad_jax.main --config=configs/unified.py --workdir=DIR`.

--mode=train (default) trains, resuming from the latest checkpoint in --workdir, then evaluates
the final model (with --config.select=auto it first chooses the recipe: grad_jax.selection);
--mode=eval reloads the latest checkpoint and evaluates it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from grad_jax import cli
from grad_jax.config import DEFAULT_CONFIG
from grad_jax.errors import UsageError
from grad_jax.evaluation import evaluate
from grad_jax.selection import select
from grad_jax.training import loop


def define_flags(values: flags.FlagValues) -> None:
    """--workdir and --mode (--config comes with `cli.run_command`)."""
    flags.DEFINE_string(
        "workdir", None, "Run folder: checkpoints, metrics, report.", flag_values=values
    )
    flags.DEFINE_enum(
        "mode", "train", ["train", "eval"], "Train (and evaluate) or only evaluate.",
        flag_values=values,
    )  # fmt: skip


def train_or_evaluate(values: flags.FlagValues, args: list[str]) -> int:
    """Train (choosing the recipe first with config.select) or evaluate --workdir."""
    if not values.workdir:
        raise UsageError("--workdir is required (the folder for checkpoints and results)")
    if values.mode == "train" and values.config.get("select"):
        select.select_and_train(values.config, values.workdir)
    elif values.mode == "train":
        loop.train_and_evaluate(values.config, values.workdir)
    else:
        evaluate.evaluate_workdir(values.workdir, values.config)
    return cli.EXIT_OK


def main(argv: Sequence[str]) -> int:
    """The command line (`argv[0]` is the program name); returns the exit status."""
    return cli.run_command(argv, __doc__, define_flags, train_or_evaluate, config=DEFAULT_CONFIG)


def run() -> None:
    """Console-script entry point (`grad-jax`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
