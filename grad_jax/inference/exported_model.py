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
  class names, the thresholds and the held-out normal scores behind them, the class centres and
  their radii, the config and its fingerprint, the jax version it was made with and the sha256
  of `model.jaxexport`.

What loading trusts: the program's sha256 (in meta.json) catches a damaged or swapped
`model.jaxexport`, and the program must take and give what meta.json describes and may call no
custom-call target outside `ALLOWED_CUSTOM_CALLS` (none that reaches the host: no callbacks, no
effects, no infeed/outfeed). meta.json itself (thresholds, classes) is trusted as it is, unless
the caller pins the folder's digest (`load_model(..., expected_sha256=...)`, the sha256 of
meta.json that `python -m grad_jax.export` prints): an edited threshold is then refused.

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
import re
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
#: The custom-call targets a model folder's program may call: those our own exports call on
#: cpu, cuda, tpu (and rocm), found by exporting the models of every scoring path (plain, tiled,
#: non-square, unified; B-series, bfloat16, either depthwise form): jax's checks of the symbolic
#: batch dimension. Anything else (LAPACK, cuSOLVER, a host callback) is refused at load.
ALLOWED_CUSTOM_CALLS = ("shape_assertion",)
#: StableHLO operations that move data to or from the host; a predict program has none.
_HOST_OPS = re.compile(r"\bstablehlo\.(send|recv|infeed|outfeed)\b")
_CUSTOM_CALL = re.compile(r"\.custom_call\b")
_PRETTY_CALL = re.compile(r"stablehlo\.custom_call\s*@([\w.$-]+)")
_GENERIC_CALL = re.compile(r'"stablehlo\.custom_call"[^\n]*?call_target_name\s*=\s*"([^"]*)"')
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(model_dir: str | os.PathLike) -> str:
    """The digest that pins a model folder (`load_model(..., expected_sha256=...)`, predict's
    --model_sha256): the sha256 of its meta.json (as `sha256sum meta.json` prints it). meta.json
    holds the sha256 of model.jaxexport, checked against the file at every load, so the digest
    covers both: the program, and the thresholds, classes and radii it is decided with."""
    return sha256_of(os.path.join(os.fspath(model_dir), META_FILE))


def _check_pin(expected: str, meta_digest: str, program_digest: str | None, path: str) -> None:
    """ModelFileError unless `expected` is the folder's digest (`folder_digest`)."""
    want = str(expected).strip().lower()
    if not _HEX_DIGEST.fullmatch(want):
        raise ModelFileError(
            f"the pinned digest {expected!r} is not 64 hexadecimal digits: pin the digest "
            "python -m grad_jax.export printed for this folder (the sha256 of its meta.json)"
        )
    if want == meta_digest:
        return
    if want == program_digest:
        raise ModelFileError(
            f"the pinned digest is the sha256 of {MODEL_FILE} alone, which does not cover the "
            f"thresholds: pin the folder's digest instead, the sha256 of {path} "
            "(python -m grad_jax.export prints it)"
        )
    raise ModelFileError(
        f"{path} has sha256 {meta_digest}, not the pinned {want}: this is not the model folder "
        "that was pinned (its thresholds, classes or program differ); use the pinned folder, or "
        "pin this one's digest if the change is intended"
    )


def _read_meta(model_dir: str, expected_sha256: str | None = None) -> dict[str, Any]:
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
        with open(path, "rb") as f:
            data = f.read()  # read once: the digest and the JSON are of the same bytes
    except OSError as err:
        raise ModelFileError(f"{path} cannot be read ({err})") from err
    if expected_sha256 is not None:
        program = os.path.join(model_dir, MODEL_FILE)
        program_digest = sha256_of(program) if os.path.exists(program) else None
        _check_pin(expected_sha256, hashlib.sha256(data).hexdigest(), program_digest, path)
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
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


def _deserialize(data: bytes, path: str, meta: dict[str, Any]) -> Any:
    from jax import export

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


def custom_call_targets(mlir_text: str) -> set[str]:
    """The custom-call targets a StableHLO module (its text) calls. ValueError when a custom call
    is written in a form this does not read, so that none goes unseen."""
    targets = _PRETTY_CALL.findall(mlir_text) + _GENERIC_CALL.findall(mlir_text)
    if len(targets) != len(_CUSTOM_CALL.findall(mlir_text)):
        raise ValueError("cannot tell the targets of every custom call in the program")
    return set(targets)


def _describe(aval: Any) -> str:
    return aval.str_short() if hasattr(aval, "str_short") else str(aval)


def _check_signature(exported: Any, meta: dict[str, Any], path: str) -> None:
    """ModelFileError unless the program takes uint8 `[n, H, W, 3]` at meta.json's input size
    and gives 'raw' and 'smoothed' float32 `[n, H, W]`, 'score' float32 `[n]` and 'pooled'
    float32 `[n, D]` (D: the class centres' width, when meta.json has centres)."""
    h, w = (int(x) for x in meta["input"]["image_size"])
    again = "the two files do not belong together: export the model again"
    avals = list(exported.in_avals)
    x = avals[0] if len(avals) == 1 else None
    if (
        x is None
        or exported.in_tree.num_leaves != 1
        or x.dtype != np.uint8
        or len(x.shape) != 4
        or isinstance(x.shape[0], int)
        or tuple(x.shape[1:]) != (h, w, 3)
    ):
        got = ", ".join(_describe(a) for a in avals)
        raise ModelFileError(
            f"{path} takes {got} but {META_FILE} describes uint8 [n, {h}, {w}, 3]: {again}"
        )
    n = str(x.shape[0])
    outputs = jax.tree.unflatten(exported.out_tree, list(exported.out_avals))
    centres = (meta.get("class_centres") or {}).get("centres") or []
    width = len(centres[0]) if centres else None
    want = {
        "raw": ((n, h, w), f"[n, {h}, {w}]"),
        "smoothed": ((n, h, w), f"[n, {h}, {w}]"),
        "score": ((n,), "[n]"),
        "pooled": ((n, width), f"[n, {width if width else 'D'}]"),
    }
    if not isinstance(outputs, dict) or sorted(outputs) != sorted(want):
        names = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ModelFileError(
            f"{path} gives {names}, not the outputs {META_FILE} describes ({', '.join(want)}): "
            + again
        )
    for name, (shape, text) in want.items():
        aval = outputs[name]
        got = tuple(str(d) for d in aval.shape)
        fits = len(got) == len(shape) and all(
            g == str(s) for g, s in zip(got, shape, strict=True) if s is not None
        )
        if aval.dtype != np.float32 or not fits:
            raise ModelFileError(
                f"{path}: output '{name}' {_describe(aval)} but {META_FILE} describes float32 "
                f"{text}: {again}"
            )


def check_program(exported: Any, meta: dict[str, Any], path: str) -> None:
    """ModelFileError unless the deserialised program fits meta.json (`_check_signature`) and
    does only what our own exports do: no effects, no custom calls outside
    `ALLOWED_CUSTOM_CALLS` (host callbacks are custom calls), no transfers to or from the host."""
    _check_signature(exported, meta, path)
    effects = [*exported.ordered_effects, *exported.unordered_effects]
    if effects:
        raise ModelFileError(
            f"{path} has effects ({', '.join(map(str, effects))}); a grad_jax predict program "
            "has none: refused (export the model again with grad_jax)"
        )
    text = exported.mlir_module()
    try:
        targets = custom_call_targets(text)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}; refused") from None
    foreign = sorted(targets - set(ALLOWED_CUSTOM_CALLS))
    if foreign:
        raise ModelFileError(
            f"{path} calls custom-call targets {', '.join(foreign)}, outside those grad_jax's "
            f"own exports use ({', '.join(ALLOWED_CUSTOM_CALLS)}): refused (such a call may run "
            "code outside the program, e.g. a host callback; export the model again with "
            "grad_jax)"
        )
    host = sorted(set(_HOST_OPS.findall(text)))
    if host:
        raise ModelFileError(
            f"{path} exchanges data with the host ({', '.join(host)}); a grad_jax predict "
            "program does not: refused"
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
    program read from `model.jaxexport` (see `load_model` for what is checked)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        batch_size: int = 16,
        expected_sha256: str | None = None,
    ):
        model_dir = os.fspath(model_dir)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = model_dir
        meta = _read_meta(model_dir, expected_sha256)
        path = os.path.join(model_dir, MODEL_FILE)
        if not os.path.exists(path):
            raise ModelFileError(f"{path} not found: copy the whole exported folder")
        with open(path, "rb") as f:
            data = f.read()  # read once: the digest and the program are of the same bytes
        want = meta.get("model_sha256")
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise ModelFileError(
                f"{path} is damaged: its sha256 is {got}, meta.json expects {want}; copy the "
                "folder again or export the model again"
            )
        exported = _deserialize(data, path, meta)
        check_platform(tuple(exported.platforms), export_platform(), path)
        check_program(exported, meta, path)
        spec = _scoring_spec(meta)
        program = ExportedProgram(exported, spec.input_size, batch_size)
        super().__init__(program, spec, meta, batch_size)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program on uint8 `[n, H, W, 3]` at its input size (any n)."""
        return self.program(batch)


def load_model(
    model_dir: str | os.PathLike, batch_size: int = 16, expected_sha256: str | None = None
) -> ExportedModel:
    """The exported model in `model_dir`; ModelFileError (one clear message) if it cannot be
    used: missing or damaged files, another format version, outside jax's compatibility window,
    a program that does not fit meta.json (input and output shapes and dtypes) or that calls
    custom-call targets outside `ALLOWED_CUSTOM_CALLS` or has effects.

    `expected_sha256`: the folder's digest to insist on (`folder_digest`: the sha256 of
    meta.json, which holds the program's; `python -m grad_jax.export` prints it). Without it
    meta.json is trusted as it is (an edited threshold loads); with it, any change to either
    file is refused.
    """
    return ExportedModel(model_dir, batch_size, expected_sha256)
