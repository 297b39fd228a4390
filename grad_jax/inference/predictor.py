"""`Predictor`: a trained run folder ready to score images from Python.

    from grad_jax.inference.predictor import Predictor

    predictor = Predictor.from_workdir("runs/bottle")
    for p in predictor.predict([image_a, image_b]):  # numpy arrays of any size
        print(p.score, p.is_anomalous, p.anomaly_map.shape)
    ok, failed = predictor.predict_files(["a.png", "b.jpg"])

Everything around the device program (preparing, batching, tiling, deciding) is the one scorer
(`grad_jax.inference.scorer.Scorer`); a run folder only supplies the program: the jitted predict
function of its latest checkpoint (`grad_jax.inference.device_program`), sharded over the local
devices and compiled once for batches of `batch_size` rounded up to the device count.
"""

from __future__ import annotations

import os
from typing import Any

from grad_jax.errors import UsageError
from grad_jax.inference import device_program
from grad_jax.inference.scorer import Scorer, ScoringSpec
from grad_jax.runs import run_folder


class Predictor(Scorer):
    """A trained model (variables and config, e.g. from a run folder) ready to score images;
    see `Scorer` for everything it does."""

    def __init__(
        self,
        variables: Any,
        config: Any,
        batch_size: int = 16,
        meta: dict[str, Any] | None = None,
        step: int | None = None,
        workdir: str | None = None,
    ):
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        self.config = config
        self.step = step
        self.workdir = workdir
        stats = device_program.map_stats(meta or {})
        predict = device_program.make_predict_fn(variables, config, map_stats=stats)
        program = device_program.PaddedProgram(predict, batch_size)
        super().__init__(program, ScoringSpec.from_config(config), meta or {}, batch_size)

    @classmethod
    def from_workdir(
        cls, workdir: str | os.PathLike, step: int | None = None, batch_size: int = 16
    ) -> Predictor:
        """The model of a run folder (its latest readable checkpoint, or checkpoint `step`).

        Raises RunFolderError (a FileNotFoundError) if `workdir` is not a run folder or has no
        such checkpoint.
        """
        workdir = os.fspath(workdir)
        trained = run_folder.load_trained(workdir, step=None if step is None else int(step))
        about = {"source": "run folder", "run": os.path.basename(os.path.normpath(workdir))}
        return cls(
            trained.variables,
            trained.config,
            batch_size=batch_size,
            meta={**trained.meta, **about, "checkpoint_step": trained.step},
            step=trained.step,
            workdir=workdir,
        )
