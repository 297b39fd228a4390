"""What a training run records besides checkpoints: the metrics log, and the stop request.

`MetricsLog` writes `<workdir>/metrics.jsonl` (one JSON object per logged step) and checks that
the loss stayed finite; `StopFlag` turns SIGINT/SIGTERM into a request that the training loop
honours after the same step on every process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from grad_jax.errors import NonFiniteLossError

log = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; truncated to the resumed step."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, METRICS_LOG)
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError):
                        break  # a line cut by a kill: drop it and what follows
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def record_step(
        self,
        step: int,
        step_metrics: dict[str, Any],
        filenames: Iterable[str],
        images_per_s: float,
        schedules: dict[str, Callable[[int], Any]],
        steps_per_epoch: int,
        log_every: int,
    ) -> None:
        """Check the loss of `step` (NonFiniteLossError naming the batch's files if it is NaN
        or Inf), and log the step every `log_every` steps and at step 1."""
        loss = float(step_metrics["loss"])
        if not np.isfinite(loss):
            shown = ", ".join(list(filenames)[:16])
            raise NonFiniteLossError(
                f"loss became {loss} at step {step} (epoch {(step - 1) // steps_per_epoch + 1}); "
                f"batch files: {shown}. The last good checkpoint is kept; check these images or "
                "lower the learning rates."
            )
        if step % log_every == 0 or step == 1:
            self.write(
                {
                    "step": step,
                    "epoch": (step - 1) // steps_per_epoch,
                    "loss": loss,
                    "grad_norm": float(step_metrics["grad_norm"]),
                    "lr_grid": float(schedules["grid"](step - 1)),
                    "lr_net": float(schedules["net"](step - 1)),
                    "images_per_s": images_per_s,
                }
            )


class StopFlag:
    """SIGINT/SIGTERM set a flag. The flag travels inside the next training step's batch; when
    that step's result shows a request from any process, every process saves a checkpoint after
    the same step and stops (one step later than the signal, and never a hang when the signal
    reaches only some hosts)."""

    def __init__(self):
        self.stop = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def requested(self) -> bool:
        return self.stop

    def _handle(self, signum, frame):
        if self.stop:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop = True
        log.warning("signal %d: saving a checkpoint and stopping (send again to abort)", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
