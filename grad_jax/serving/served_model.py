"""The model behind the inspection service: what it must offer, and how to load one.

`ServedModel` is the interface shared by `grad_jax.inference.predictor.Predictor` and the
exported model (`grad_jax.inference.exported_model.load_model`):
`predict(images, categories=None) -> list[Prediction]`,
`image_size`, `categories`, `meta`, `batch_size`. `PredictorModel` puts a run folder's
Predictor behind it; `load_model` opens either kind of folder.
"""

import os
from collections.abc import Sequence
from typing import Any, Protocol

from grad_jax.inference import exported_model
from grad_jax.inference.predictor import Predictor


class ServedModel(Protocol):
    """What the service needs of a model (Predictor and the exported model both offer it)."""

    image_size: tuple[int, int]
    categories: Sequence[str]
    meta: dict[str, Any]
    batch_size: int

    def predict(
        self, images: Sequence[Any], categories: Sequence[str | None] | None = None
    ) -> list[Any]: ...


class PredictorModel:
    """A run folder's `Predictor` behind the served-model interface: predictions pass straight
    through; `meta` adds what the page shows about the run (folder name, step, size, classes)."""

    def __init__(self, predictor: Any):
        self.predictor = predictor
        self.image_size = tuple(int(x) for x in predictor.image_size)
        self.batch_size = int(predictor.batch_size)
        self.categories = list(predictor.categories)

    @property
    def meta(self) -> dict[str, Any]:
        p = self.predictor
        meta = dict(p.meta)
        meta.update(
            source="run folder",
            run=os.path.basename(os.path.normpath(p.workdir)) if p.workdir else None,
            step=p.step,
            image_size=list(self.image_size),
            categories=list(self.categories),
        )
        return meta

    def predict(
        self, images: Sequence[Any], categories: Sequence[str | None] | None = None
    ) -> list[Any]:
        return self.predictor.predict(images, categories=categories)


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded as asked; the message says what to do instead."""


def load_model(
    model_dir: str | None = None,
    workdir: str | None = None,
    batch_size: int = 8,
    step: int | None = None,
) -> ServedModel:
    """An exported model folder (`grad_jax.inference.exported_model.load_model`) or a run
    folder (Predictor)."""
    if (model_dir is None) == (workdir is None):
        raise ModelUnavailable("give exactly one of --model=MODEL_DIR and --workdir=RUN_DIR")
    if model_dir is not None:
        return exported_model.load_model(model_dir, batch_size=batch_size)
    return PredictorModel(Predictor.from_workdir(workdir, step=step, batch_size=batch_size))
