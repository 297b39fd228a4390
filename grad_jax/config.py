"""Configs: finding and loading a config file, and checking one before any work starts.

Config files are Python files with `get_config()` (ml_collections); the shipped ones are the
top-level `configs/` folder of the repository, installed with the package as `grad_jax.configs`
(one copy of each file). A path such as `configs/unified.py` that does not exist where the command
runs names the shipped file of that name, so the README's commands work from any folder.

This module sits above `models` (not below, as "config at the bottom" would have it): checking a
config means knowing the model's vocabulary (backbone variants, depthwise implementations),
while the models themselves take plain numbers and never read a config.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections

from grad_jax import configs
from grad_jax.devices import sharding
from grad_jax.devices.precision import PRECISIONS
from grad_jax.errors import ConfigError, MissingFileError
from grad_jax.models.efficientnet import VARIANTS
from grad_jax.models.knn import KINDS
from grad_jax.models.layers import DEPTHWISE_IMPLS

#: `data.image_size='auto'`: measured on the training images (see `input_pipeline`).
AUTO_SIZE = "auto"
#: The folder of the shipped config files.
CONFIG_DIR = os.path.dirname(os.path.abspath(configs.__file__))
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "default.py")


def resolve_config_path(spec: str) -> str:
    """`path.py[:arg]` as given when the path exists, else the shipped config of that name
    (`configs/unified.py` -> `<package>/configs/unified.py`); unchanged if neither exists (the
    loader then names the missing file)."""
    path, sep, arg = spec.partition(":")
    if os.path.exists(path) or os.path.dirname(os.path.normpath(path)) not in ("configs", ""):
        return spec
    shipped = os.path.join(CONFIG_DIR, os.path.basename(path))
    return shipped + sep + arg if os.path.exists(shipped) else spec


def resolve_config_flags(argv: list[str]) -> list[str]:
    """`argv` with every `--config=PATH` resolved by `resolve_config_path`."""
    flag = "--config="
    return [flag + resolve_config_path(a[len(flag) :]) if a.startswith(flag) else a for a in argv]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns."""
    path, _, arg = resolve_config_path(spec).partition(":")
    if not os.path.exists(path):
        shipped = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[0] != "_")
        raise MissingFileError(
            f"config file {path} does not exist (shipped configs: "
            + ", ".join("configs/" + f for f in shipped)
            + ")"
        )
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # a user's config beside its own `configs` package
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("grad_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def tiling_on(config: ml_collections.ConfigDict) -> bool:
    """True when `data.tile.size > 0`: train and score on tiles (see grad_jax/tiling.py)."""
    tile = config.data.get("tile")
    return bool(tile is not None and tile.size > 0)


def image_stride(config: ml_collections.ConfigDict) -> int:
    """The coarsest backbone stride used: the model input's sides must be multiples of it."""
    return 2 ** max(config.model.out_layers)


class _Problems(list):
    """The problems found so far; `need(ok, message)` adds `message` when `ok` is false."""

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def validate_config(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
    """Check every value a run depends on before any work starts; all problems in one error."""
    problems = _Problems()
    _check_model(config.model, problems)
    _check_data(config, problems)
    e = config.eval
    problems.need(e.batch_size > 0, f"eval.batch_size={e.batch_size} must be positive")
    problems.need(
        e.smooth_size >= 1 and e.smooth_size % 2 == 1, "eval.smooth_size must be odd and >= 1"
    )
    problems.need(e.score_pool >= 1, "eval.score_pool must be >= 1")
    _check_kind(config, problems)
    if training:
        _check_training(config, problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_model(m: ml_collections.ConfigDict, problems: _Problems) -> None:
    need = problems.need
    need(m.backbone in VARIANTS, f"model.backbone={m.backbone!r}: one of {', '.join(VARIANTS)}")
    need(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: 'float32' or 'bfloat16'")
    precision = m.get("precision", "default")  # absent in run folders from before the field
    need(precision in PRECISIONS, f"model.precision={precision!r}: one of {PRECISIONS}")
    need(m.depthwise_impl in DEPTHWISE_IMPLS, f"model.depthwise_impl: one of {DEPTHWISE_IMPLS}")
    need(m.ch_exp > 0 and m.ch_exp % 4 == 0, f"model.ch_exp={m.ch_exp}: a positive multiple of 4")
    need(m.layers >= 1, "model.layers must be at least 1")
    need(m.local_resol >= 1 and m.global_resol >= 1, "model.local_resol/global_resol >= 1")
    layers_ok = len(m.out_layers) >= 1 and all(1 <= x <= 5 for x in m.out_layers)
    need(layers_ok, f"model.out_layers={tuple(m.out_layers)}: stage numbers in 1..5")
    if layers_ok:
        finest = 2 ** min(m.out_layers)
        need(
            m.out_stride in (1, 2, 4, 8, 16, 32) and m.out_stride <= finest,
            f"model.out_stride={m.out_stride}: a power of two no larger than {finest}",
        )


def _check_kind(config: ml_collections.ConfigDict, problems: _Problems) -> None:
    kind = config.model.get("kind", "grad")  # absent in run folders from before the field
    problems.need(kind in KINDS, f"model.kind={kind!r}: one of {', '.join(KINDS)}")
    knn = config.get("knn")
    if knn is None:
        problems.need(kind == "grad", f"model.kind={kind!r} needs the knn section of the config")
        return
    problems.need(0 <= knn.fraction <= 1, f"knn.fraction={knn.fraction}: in [0, 1] (0: off)")
    problems.need(
        knn.patch_size >= 1 and knn.patch_size % 2 == 1, "knn.patch_size must be odd and >= 1"
    )
    problems.need(knn.projection_dim >= 0, "knn.projection_dim must be >= 0 (0: exact)")
    problems.need(
        kind == "grad" or knn.fraction > 0,
        f"model.kind={kind!r} needs the memory bank: set knn.fraction > 0",
    )
    problems.need(
        kind != "grad+knn" or config.threshold.holdout_fraction > 0,
        "model.kind='grad+knn' standardises both maps by held-out normal images: set "
        "threshold.holdout_fraction > 0",
    )


def _check_data(config: ml_collections.ConfigDict, problems: _Problems) -> None:
    d, need = config.data, problems.need
    need(
        d.dataset in ("mvtec_ad", "folder", "demo"), "data.dataset: 'mvtec_ad', 'folder' or 'demo'"
    )
    out_layers = config.model.out_layers
    if not (len(out_layers) >= 1 and all(1 <= x <= 5 for x in out_layers)):
        return  # the sizes below depend on the stages (reported by _check_model)
    coarsest = image_stride(config)
    if d.image_size == AUTO_SIZE:
        need(
            isinstance(d.auto_pixels, int) and d.auto_pixels >= coarsest * coarsest,
            f"data.auto_pixels={d.auto_pixels!r}: an int of at least {coarsest * coarsest}",
        )
    else:
        size_ok = (
            isinstance(d.image_size, tuple | list)
            and len(d.image_size) == 2
            and all(isinstance(n, int) and n > 0 and n % coarsest == 0 for n in d.image_size)
        )
        need(
            size_ok,
            f"data.image_size={d.image_size!r}: (height, width), two multiples of the "
            f"coarsest stride {coarsest} (e.g. {(coarsest * 14, coarsest * 6)}), or 'auto'",
        )
    tile = d.get("tile")
    if tile is not None and tile.size:
        need(
            isinstance(tile.size, int) and tile.size > 0 and tile.size % coarsest == 0,
            f"data.tile.size={tile.size!r}: 0 (off) or a multiple of {coarsest}",
        )
        need(
            isinstance(tile.overlap, int) and 0 <= tile.overlap < tile.size,
            f"data.tile.overlap={tile.overlap!r}: pixels in [0, data.tile.size)",
        )
        need(tile.scale > 0, f"data.tile.scale={tile.scale!r}: positive (1.0 = native)")


def _check_training(config: ml_collections.ConfigDict, problems: _Problems) -> None:
    t, need = config.train, problems.need
    need(t.epochs > 0, f"train.epochs={t.epochs} must be positive")
    need(t.cache_features in ("auto", "on", "off"), "train.cache_features: auto, on or off")
    need(0 <= config.threshold.holdout_fraction < 1, "threshold.holdout_fraction in [0, 1)")
    target = config.threshold.get("target_false_alarm")
    need(
        isinstance(target, int | float) and 0 < target < 1,
        f"threshold.target_false_alarm={target!r}: a false-alarm rate in (0, 1), e.g. 0.01",
    )
    margin = config.threshold.get("class_margin", 0.0)  # absent in older run folders
    need(
        isinstance(margin, int | float) and (margin == 0 or margin >= 1),
        f"threshold.class_margin={margin!r}: 0 (never reject a class) or at least 1",
    )
    need(t.lr_step_epochs > 0, "train.lr_step_epochs must be positive")
    try:
        sharding.check_batch_size(t.batch_size, "train.batch_size")
    except ValueError as err:
        problems.append(str(err))
