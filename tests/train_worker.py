"""Run a tiny training in a subprocess (multi-device, multi-process and signal tests).

    python tests/train_worker.py WORKDIR DATA_ROOT TFDS_DIR EPOCHS [HOLDOUT [BN_GROUP]]

Distributed settings come from GRAD_JAX_* environment variables (see grad_jax/sharding.py).
GRAD_JAX_TEST_STEP_DELAY=<seconds> slows every training step down, so that a signal sent by a
test lands mid-training. The worker records, in WORKDIR, `test_scores.json` (the evaluation's
per-image scores) and `test_devices.json` (the device and process counts it ran with).
Errors end as the CLI ends them (Ctrl-C / SIGTERM: exit status 130).
"""

import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from grad_jax.configs import tiny  # noqa: E402

from grad_jax import cli
from grad_jax.evaluation import evaluate
from grad_jax.training import loop


def tiny_config(root: str, data_dir: str, epochs: int, holdout: float = 0.0, bn_group: int = 0):
    config = tiny.get_config()
    config.data.root = root
    config.data.data_dir = data_dir
    config.train.epochs = epochs
    config.train.batch_size = 4
    config.threshold.holdout_fraction = holdout
    config.model.bn_group_size = bn_group
    return config


def record_scores(publish=evaluate.publish):
    """evaluate.publish that also writes the per-image test scores (process 0)."""

    def wrapped(workdir, results, info, *rest):
        import jax

        if jax.process_index() == 0:
            scores = {
                f: float(s) for r in results for f, s in zip(r.filenames, r.scores, strict=True)
            }
            with open(os.path.join(workdir, "test_scores.json"), "w") as f:
                json.dump(scores, f)
            with open(os.path.join(workdir, "test_devices.json"), "w") as f:
                json.dump({"devices": jax.device_count(), "processes": jax.process_count()}, f)
        return publish(workdir, results, info, *rest)

    return wrapped


def slow_steps(delay: float):
    original = loop.make_train_step

    def make(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def step(*a):
            time.sleep(delay)
            return step_fn(*a)

        return step

    loop.make_train_step = make


if __name__ == "__main__":
    workdir, root, data_dir, epochs = sys.argv[1:5]
    holdout = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    bn_group = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    cli.configure_logging()
    evaluate.publish = record_scores()
    delay = float(os.environ.get("GRAD_JAX_TEST_STEP_DELAY", "0"))
    if delay:
        slow_steps(delay)
    with cli.friendly_errors():
        config = tiny_config(root, data_dir, int(epochs), holdout, bn_group)
        loop.train_and_evaluate(config, workdir)
