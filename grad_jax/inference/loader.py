"""Open either kind of model folder as the one scorer (`grad_jax.inference.scorer.Scorer`).

    from grad_jax.inference.loader import load_scorer

    model = load_scorer(model_dir="models/my_part")   # an exported model folder
    model = load_scorer(workdir="runs/my_part")       # or a training run folder

An exported folder loads with jax, numpy and Pillow only; a run folder also needs the training
stack (flax, orbax), imported only then.
"""

from __future__ import annotations

from grad_jax.errors import UsageError
from grad_jax.inference import exported_model
from grad_jax.inference.scorer import Scorer


def load_scorer(
    model_dir: str | None = None,
    workdir: str | None = None,
    batch_size: int = 8,
    step: int | None = None,
    expected_sha256: str | None = None,
) -> Scorer:
    """The model of an exported folder (`model_dir`, refused unless its digest is
    `expected_sha256` when that is given: see `exported_model.load_model`) or of a run folder
    (`workdir`, at its latest checkpoint or `step`): exactly one of the two. Raises UsageError,
    ModelFileError or RunFolderError with a message that says what to do."""
    if (model_dir is None) == (workdir is None):
        raise UsageError("give exactly one of --model=MODEL_DIR and --workdir=RUN_DIR")
    if model_dir is not None:
        if step is not None:
            raise UsageError("--step applies to a run folder (--workdir), not to an exported model")
        return exported_model.load_model(
            model_dir, batch_size=batch_size, expected_sha256=expected_sha256
        )
    if expected_sha256 is not None:
        raise UsageError(
            "--model_sha256 pins an exported model folder (--model), not a run folder (--workdir)"
        )
    from grad_jax.inference import predictor  # the training stack: only for run folders

    return predictor.Predictor.from_workdir(workdir, step=step, batch_size=batch_size)
