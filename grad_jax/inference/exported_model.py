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
- `meta.json`: the input size and resize rule, the tiling and scoring geometry (`scoring`), the
  class names, the thresholds and the held-out normal scores behind them, the class centres, the
  config and its fingerprint, the jax version it was made with and the sha256 of
  `model.jaxexport`.

Everything around the program (preparing, batching, tiling and stitching, deciding) is the one
scorer (`grad_jax.inference.scorer.Scorer`), exactly as for `Predictor`: a model exported from a
tiled run scores its tiles and the scorer stitches them.

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

from grad_jax.errors import ModelFileError
from grad_jax.inference.scorer import Scorer, ScoringSpec

MODEL_FILE = "model.jaxexport"
META_FILE = "meta.json"
FORMAT = "grad_jax.exported_model"
FORMAT_VERSION = 2
#: Versions this loader reads (1: before `scoring` was stored; it is derived from the config).
READABLE_VERSIONS = (1, 2)
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
    if version not in READABLE_VERSIONS:
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


def export_platform() -> str:
    """This machine's platform as `jax.export` names it ('cpu', 'cuda', 'rocm' or 'tpu'; not
    `jax.default_backend()`'s 'gpu')."""
    from jax import export

    return export.default_export_platform()


def check_platform(lowered_for: Sequence[str], platform: str, path: str) -> None:
    """ModelFileError unless the program was lowered for `platform` (a `jax.export` name)."""
    if platform not in lowered_for:
        raise ModelFileError(
            f"{path} was lowered for {', '.join(lowered_for)}, and this machine runs {platform} "
            f"(as jax.export names it): export it again with --platforms including {platform}"
        )


def _buckets(batch_size: int) -> list[int]:
    sizes, n = [], 1
    while n < batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, batch_size]


def _scoring_spec(meta: dict[str, Any]) -> ScoringSpec:
    """The scoring geometry of `meta`; version 1 files stored it only inside their config."""
    if "scoring" in meta:
        return ScoringSpec.from_meta(meta)
    config = meta.get("config") or {}
    tile = (config.get("data") or {}).get("tile") or {}
    evaluation = config.get("eval") or {}
    return ScoringSpec(
        tuple(int(x) for x in meta["input"]["image_size"]),
        int(evaluation.get("smooth_size", 21)),
        int(evaluation.get("score_pool", 32)),
        int(tile.get("size", 0)),
        int(tile.get("overlap", 0)),
        float(tile.get("scale", 1.0)),
    )


class ExportedProgram:
    """The deserialised program as a `scorer.Program`: a call of n images runs at the smallest
    of 1, 2, 4, ..., `batch_size` rows that holds them (zero-padded), so at most
    log2(batch_size) + 1 programs are ever compiled."""

    def __init__(self, exported: Any, input_size: tuple[int, int], batch_size: int):
        self.exported = exported
        self.input_size = input_size
        self.buckets = _buckets(int(batch_size))
        self._call = jax.jit(exported.call)

    def rows(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), n)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program on uint8 `[n, H, W, 3]` (any n) -> its outputs as numpy."""
        batch = np.asarray(batch)
        h, w = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (h, w, 3) or batch.dtype != np.uint8:
            raise ValueError(
                f"batch {batch.shape} {batch.dtype}: expected (n, {h}, {w}, 3) uint8 "
                "(use predict() for images of other sizes)"
            )
        return {k: np.asarray(v) for k, v in self._call(batch).items()}


class ExportedModel(Scorer):
    """A model loaded from an exported folder: the same `Scorer` as `Predictor`, with the
    program read from `model.jaxexport`."""

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 16):
        model_dir = os.fspath(model_dir)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = model_dir
        meta = _read_meta(model_dir)
        path = os.path.join(model_dir, MODEL_FILE)
        if not os.path.exists(path):
            raise ModelFileError(f"{path} not found: copy the whole exported folder")
        want = meta.get("model_sha256")
        got = sha256_of(path)
        if got != want:
            raise ModelFileError(
                f"{path} is damaged: its sha256 is {got}, meta.json expects {want}; copy the "
                "folder again or export the model again"
            )
        exported = _deserialize(path, meta)
        check_platform(tuple(exported.platforms), export_platform(), path)
        spec = _scoring_spec(meta)
        program = ExportedProgram(exported, spec.input_size, batch_size)
        super().__init__(program, spec, meta, batch_size)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program on uint8 `[n, H, W, 3]` at its input size (any n)."""
        return self.program(batch)


def load_model(model_dir: str | os.PathLike, batch_size: int = 16) -> ExportedModel:
    """The exported model in `model_dir`; ModelFileError (one clear message) if it cannot be
    used: missing or damaged files, another format version, outside jax's compatibility window.
    """
    return ExportedModel(model_dir, batch_size)
