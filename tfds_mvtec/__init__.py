"""MVTec AD and MVTec-layout folders as tensorflow-datasets builders that need no TensorFlow.

    import tfds_mvtec
    builder = tfds_mvtec.prepare("../shared/datasets/magnetic_tile", data_dir)  # or "bottle"
    train = builder.as_data_source()["train"]   # random access, e.g. for grain
    example = train[0]  # {'image': HxWx3 uint8, 'mask': HxWx1 uint8, 'label': int, ...}

The layout checks (`scan_category`, `DatasetLayoutError`, `load_rgb`, ...) are imported eagerly
and need only Pillow and numpy; the tfds-backed names (`prepare`, `folder_builder`, ...) are
resolved on first use, so that importing this package does not import tensorflow-datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

from tfds_mvtec.mvtec_ad.layout import (
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    BadImageError,
    CategoryLayout,
    DatasetLayoutError,
    Sample,
    load_mask,
    load_rgb,
    scan_category,
)

_BUILDER_MODULE = "tfds_mvtec.mvtec_ad.mvtec_ad_dataset_builder"
_LAZY = frozenset(
    {
        "prepare",
        "folder_builder",
        "mvtec_builder",
        "make_builder",
        "folder_config",
        "skipped_images",
        "features",
        "FolderConfig",
        "MvtecAd",
        "MvtecLayoutFolder",
        "MANUAL_DOWNLOAD_INSTRUCTIONS",
    }
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "BadImageError",
    "CategoryLayout",
    "DatasetLayoutError",
    "Sample",
    "load_mask",
    "load_rgb",
    "scan_category",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    """Import the tfds builder module only when one of its names is first used (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_BUILDER_MODULE), name)
    raise AttributeError(f"module 'tfds_mvtec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
