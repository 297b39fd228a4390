"""Load and run an exported model (`python -m grad_jax.export`) with jax, numpy and Pillow only.

    from grad_jax.inference.exported_model import load_model

    model = load_model("model_dir")              # model.jaxexport + meta.json
    for p in model.predict([image_a, image_b]):  # any size and mode, as Predictor takes
        print(p.score, p.calibrated, p.category, p.is_anomalous, p.threshold_source)

The model folder holds:

- `model.jaxexport`: the serialised `jax.export` of the whole predict program (backbone, neck,
  head, anomaly map, 21x21 smoothing, image score, pooled features), weights included, with a
  symbolic batch dimension, lowered for cpu, cuda and tpu. Input: uint8 `[N, H, W, 3]` at the
  model input size (the normalisation is inside). Outputs: a dict of 'raw' and 'smoothed'
  `[N, H, W]` float32 maps, 'score' `[N]` and 'pooled' `[N, D]`;
- `meta.json`: the input size and resize rule, the class names, the thresholds and the held-out
  normal scores behind them, the class centres, the config and its fingerprint, the jax version
  it was made with and the sha256 of `model.jaxexport`.

This module imports no flax, optax, orbax, tensorflow-datasets, grain or ml_collections (a test
checks it in a fresh interpreter), so a deployment needs `pip install jax pillow numpy` and the
grad_jax package.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from grad_jax.data import images as image_lib
from grad_jax.errors import ModelFileError
from grad_jax.inference.decisions import Decisions, Prediction

MODEL_FILE = "model.jaxexport"
META_FILE = "meta.json"
FORMAT = "grad_jax.exported_model"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_meta(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, META_FILE)
    if not os.path.isdir(model_dir):
        raise ModelFileError(
            f"{model_dir} is not a folder: pass the --out folder of python -m grad_jax.export"
        )
    if not os.path.exists(path):
        raise ModelFileError(
            f"{path} not found: {model_dir} is not an exported grad_jax model (make one with "
            "python -m grad_jax.export --workdir=RUN --out=DIR)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is damaged ({err}): export the model again") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} does not describe a grad_jax exported model")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ModelFileError(
            f"{path}: exported model format version {version}, this grad_jax reads version "
            f"{FORMAT_VERSION}; "
            + (
                "upgrade grad_jax to load it"
                if newer
                else "export the model again with this grad_jax"
            )
        )
    return meta


def _check_jax_window(exported: Any, meta: dict[str, Any], path: str) -> None:
    from jax import export

    version = exported.calling_convention_version
    low = export.minimum_supported_calling_convention_version
    high = export.maximum_supported_calling_convention_version
    if not low <= version <= high:
        raise ModelFileError(
            f"{path} was exported with jax {meta.get('jax_version')} (calling convention "
            f"{version}); jax {jax.__version__} reads versions {low}..{high}, outside jax's "
            "compatibility window: install a jax close to the one it was made with, or export "
            "it again with this one"
        )


def _deserialize(path: str, meta: dict[str, Any]) -> Any:
    from jax import export

    with open(path, "rb") as f:
        data = f.read()
    try:
        exported = export.deserialize(bytearray(data))
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        made = meta.get("jax_version")
        raise ModelFileError(
            f"{path} cannot be read by jax {jax.__version__} (it was made with jax {made}): "
            f"{type(err).__name__}: {err}. It is outside jax's compatibility window or "
            "damaged: export it again with this jax"
        ) from err
    _check_jax_window(exported, meta, path)
    return exported


def _buckets(batch_size: int) -> list[int]:
    sizes, n = [], 1
    while n < batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, batch_size]


class ExportedModel:
    """A model loaded from an exported folder; the same `predict` as `Predictor`.

    Batches of n images run at the smallest size in 1, 2, 4, ..., `batch_size` that holds
    them (zero-padded), so at most log2(batch_size) + 1 programs are ever compiled.
    """

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 16):
        model_dir = os.fspath(model_dir)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = model_dir
        self.meta: dict[str, Any] = _read_meta(model_dir)
        path = os.path.join(model_dir, MODEL_FILE)
        if not os.path.exists(path):
            raise ModelFileError(f"{path} not found: copy the whole exported folder")
        want = self.meta.get("model_sha256")
        got = sha256_of(path)
        if got != want:
            raise ModelFileError(
                f"{path} is damaged: its sha256 is {got}, meta.json expects {want}; copy the "
                "folder again or export the model again"
            )
        self._exported = _deserialize(path, self.meta)
        platform = jax.default_backend()
        platforms = tuple(self._exported.platforms)
        if platform not in platforms:
            raise ModelFileError(
                f"{path} was lowered for {', '.join(platforms)}, not for this machine's "
                f"{platform}: export it again with --platforms including {platform}"
            )
        self.batch_size = int(batch_size)
        self.image_size: tuple[int, int] = tuple(int(x) for x in self.meta["input"]["image_size"])
        self.decisions = Decisions(self.meta)
        self._call = jax.jit(self._exported.call)

    @property
    def categories(self) -> list[str]:
        return list(self.decisions.categories)

    @property
    def threshold(self) -> float | None:
        """The run-wide threshold (see `Predictor.threshold`); assigning it fixes it."""
        d = self.decisions
        return d.fixed_threshold if d.fixed else d.run_threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self.decisions.fix_threshold(value)

    def prepare(self, image: Any, name: str = "<image>") -> np.ndarray:
        """One image (see `grad_jax.data.images.to_rgb8`) -> `[H, W, 3]` uint8 at the input size."""
        return image_lib.prepare(image, self.image_size, name)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program on uint8 `[n, H, W, 3]` (any n) -> its outputs as numpy."""
        batch = np.asarray(batch)
        h, w = self.image_size
        if batch.ndim != 4 or batch.shape[1:] != (h, w, 3) or batch.dtype != np.uint8:
            raise ValueError(
                f"batch {batch.shape} {batch.dtype}: expected (n, {h}, {w}, 3) uint8 "
                "(use predict() for images of other sizes)"
            )
        out = self._call(batch)
        return {k: np.asarray(v) for k, v in out.items()}

    def predict(
        self,
        images: Sequence[Any],
        categories: Sequence[str | None] | str | None = None,
    ) -> list[Prediction]:
        """Score images of any size and mode (see `Predictor.predict`).

        `categories`: one class for all images, one per image, or None (recognised from the
        image when the model holds class centres).
        """
        return image_lib.in_batches(
            images, categories, self.batch_size, self.prepare, self.predict_prepared
        )

    def predict_prepared(
        self,
        batch: Sequence[np.ndarray],
        categories: Sequence[str | None] | str | None = None,
    ) -> list[Prediction]:
        """Score at most `batch_size` images already at the model size (`prepare`)."""
        n = len(batch)
        if not n:
            return []
        if n > self.batch_size:
            raise ValueError(f"{n} images in one batch; at most batch_size={self.batch_size}")
        rows = next(b for b in _buckets(self.batch_size) if b >= n)
        out = self.run(image_lib.stack_prepared(batch, self.image_size, rows))
        return self.decisions.results(
            out["score"][:n], out["raw"][:n], categories, out["pooled"][:n]
        )


def load_model(model_dir: str | os.PathLike, batch_size: int = 16) -> ExportedModel:
    """The exported model in `model_dir`; ModelFileError (one clear message) if it cannot be
    used: missing or damaged files, another format version, outside jax's compatibility window.
    """
    return ExportedModel(model_dir, batch_size)
