"""Run a tiny training in a subprocess (multi-device and multi-process tests).

    python tests/train_worker.py WORKDIR DATA_ROOT TFDS_DIR EPOCHS

Distributed settings come from GRAD_JAX_* environment variables (see grad_jax/sharding.py).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import tiny  # noqa: E402
from grad_jax import cli, train  # noqa: E402


def tiny_config(root: str, data_dir: str, epochs: int):
    config = tiny.get_config()
    config.data.root = root
    config.data.data_dir = data_dir
    config.train.epochs = epochs
    config.train.batch_size = 4
    config.threshold.holdout_fraction = 0.0
    return config


if __name__ == "__main__":
    workdir, root, data_dir, epochs = sys.argv[1:5]
    cli.configure_logging()
    train.train_and_evaluate(tiny_config(root, data_dir, int(epochs)), workdir)
