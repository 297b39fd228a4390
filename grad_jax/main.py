"""Command-line entry point: `python -m grad_jax.main --config=configs/unified.py --workdir=DIR`.

--mode=train (default) trains, resuming from the latest checkpoint in --workdir, then evaluates
the final model (with --config.select=auto it first chooses the recipe: selection.py);
--mode=eval reloads the latest checkpoint and evaluates it.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from grad_jax import cli, evaluate, selection, train
from grad_jax.config import DEFAULT_CONFIG

config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file, e.g. configs/unified.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, report.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate) or only evaluate.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (the folder for checkpoints and results)")
    cli.configure_logging()
    with cli.friendly_errors():
        if FLAGS.mode == "train" and FLAGS.config.get("select"):
            selection.select_and_train(FLAGS.config, FLAGS.workdir)
        elif FLAGS.mode == "train":
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        else:
            evaluate.evaluate_workdir(FLAGS.workdir, FLAGS.config)
    return 0


def run() -> None:
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    sys.exit(run())
