"""Datasets and batches: TFDS data sources read through grain.

Every dataset (MVTec AD categories, any MVTec-layout folder, the embedded demo) is first built
with the `tfds_mvtec` builders into array_record files, then read by random access with
`builder.as_data_source()`. grain maps the decode/resize over a per-epoch index order and
batches it on background threads.

Images leave the pipeline as uint8 `[B, H, W, 3]` at the configured size (Pillow bilinear, which
antialiases on downscale exactly as the reference's torchvision Resize on PIL images does);
masks as uint8 `[B, H, W]` in {0, 1} (Pillow nearest), with `has_mask` `[B]` bool saying
whether the mask is ground truth (False for defects labelled by their folder only). The
backbone's normalisation runs on the device, as the first operation of the jitted program, so
only uint8 crosses to the device.

Order: one global permutation per epoch (seeded by (seed, epoch)); global batch i is rows
[i*B, (i+1)*B) of it, and each process reads its own contiguous slice of every global batch. The
batches are therefore the same whatever the number of processes or devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

import tfds_mvtec
from grad_jax.config import AUTO_SIZE, image_stride, tiling_on
from grad_jax.data import demo, tiling
from grad_jax.data.images import resize_image
from grad_jax.devices import sharding
from grad_jax.errors import ConfigError, DataNotFoundError, UserError

log = logging.getLogger(__name__)


class DataLayoutError(UserError, tfds_mvtec.DatasetLayoutError):
    """A dataset folder that breaks the MVTec layout rules: the builder's error, as a
    `UserError` (raised where grad_jax reads datasets)."""


@dataclasses.dataclass
class CategoryData:
    name: str
    train: Any  # random-access source of records
    test: Any


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _folder_categories(root: pathlib.Path) -> list[pathlib.Path]:
    """`root` itself if it is one MVTec-layout category, else its category subfolders."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    return found or [root]  # let the layout check explain what is missing


def default_data_dir() -> str:
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def open_categories(config: ml_collections.ConfigDict) -> list[CategoryData]:
    """Build (once) and open every category the config names."""
    d = config.data
    data_dir = d.data_dir or default_data_dir()
    if d.dataset == "mvtec_ad":
        manual_dir = d.root or os.path.join(data_dir, "downloads", "manual")
        targets = [(c, c) for c in d.categories]
    elif d.dataset in ("folder", "demo"):
        if d.dataset == "demo":
            root = demo.ensure_demo_dataset(d.root)
        else:
            if not d.root:
                raise DataNotFoundError(
                    "config.data.root is not set: pass --config.data.root=PATH to a folder in "
                    "the MVTec AD layout (PATH/train/good/*.png, PATH/test/<defect>/*.png, "
                    "PATH/ground_truth/<defect>/*_mask.png)"
                )
            root = pathlib.Path(d.root)
            if not root.is_dir():
                raise DataNotFoundError(
                    f"data folder {root} does not exist (config.data.root); point "
                    "--config.data.root at an MVTec-layout category folder"
                )
        manual_dir = None
        targets = [(p.name, str(p)) for p in _folder_categories(pathlib.Path(root))]
    else:
        raise ConfigError(
            f"config.data.dataset={d.dataset!r}: expected 'mvtec_ad', 'folder' or 'demo'"
        )

    def prepare_all():
        try:
            return [
                tfds_mvtec.prepare(
                    target, data_dir, manual_dir=manual_dir, skip_bad_images=d.skip_bad_images
                )
                for _, target in targets
            ]
        except tfds_mvtec.DatasetLayoutError as err:
            raise DataLayoutError(str(err)) from err

    builders = _first_process_builds(prepare_all, data_dir)
    out = []
    for (name, _), builder in zip(targets, builders, strict=True):
        sources = builder.as_data_source()
        out.append(CategoryData(name, sources["train"], sources["test"]))
    return out


def _first_process_builds(prepare_all, data_dir: str):
    """Run `prepare_all` on process 0 first, the other processes after it (they then reuse
    its build in a shared data_dir instead of writing the same files at the same time)."""
    if jax.process_count() == 1:
        return prepare_all()
    from jax.experimental import multihost_utils

    built, error = None, None
    if jax.process_index() == 0:
        try:
            built = prepare_all()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
            error = err
    else:
        log.info("waiting for process 0 to build the datasets in %s", data_dir)
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
        raise error
    if not int(ok):
        raise DataNotFoundError(
            f"process 0 could not build the datasets in {data_dir}; its log names the problem"
        )
    return built if built is not None else prepare_all()


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """HxW(x1) uint8 -> size (h, w) in {0, 1}, nearest neighbour as the reference."""
    m = mask[..., 0] if mask.ndim == 3 else mask
    h, w = size
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
    return (m > 0).astype(np.uint8)


def _rgb(record: dict[str, Any]) -> np.ndarray:
    """A record's image as `[H, W, 3]` (grayscale replicated, alpha dropped)."""
    image = np.asarray(record["image"])
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


@dataclasses.dataclass(frozen=True)
class Item:
    category: int  # index into the list of categories
    index: int  # index in that category's split


class IndexedSource:
    """Random access over chosen (category, index) items of several sources, decoded."""

    def __init__(
        self, sources: Sequence[Any], items: Sequence[Item], image_size, names, masks: bool = True
    ):
        """`masks=False` (training) never decodes a mask: records then have no 'mask' and no
        'has_mask'."""
        self.sources = sources
        self.items = list(items)
        self.image_size = tuple(image_size)
        self.names = list(names)
        self.masks = masks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        record = self.sources[item.category][item.index]
        out = {
            "image": resize_image(_rgb(record), self.image_size),
            "label": np.int32(record["label"]),  # from the folder: good vs defect
            "category": np.int32(item.category),
            "position": np.int32(i),
            "filename": f"{self.names[item.category]}/{_text(record['filename'])}",
        }
        if self.masks:
            out["mask"] = resize_mask(np.asarray(record["mask"]), self.image_size)
            # False: a defect folder without masks (the all-zero mask means "unknown").
            # Builds before dataset version 1.1.0 had masks for every image.
            out["has_mask"] = np.bool_(record.get("has_mask", True))
        return out


def _stack(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batches(
    source: IndexedSource,
    order: Sequence[int],
    global_batch: int,
    *,
    split_processes: bool = True,
    threads: int = 4,
    workers: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `order` (positions into `source`), decoded on background threads.

    With `split_processes`, each process gets its contiguous share of every global batch (the
    last may be smaller; its size must divide by the process count, see `epoch_order`);
    otherwise every process reads whole batches.
    """
    order = np.asarray(order, np.int64)
    local_order = []
    for start in range(0, len(order), global_batch):
        chunk = order[start : start + global_batch]
        local_order.append(sharding.process_rows(chunk) if split_processes else chunk)
    sizes = [len(c) for c in local_order]
    flat = np.concatenate(local_order) if local_order else np.zeros((0,), np.int64)
    ds = grain.MapDataset.source(_Take(source, flat)).map(lambda x: x)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    iterator = iter(it)
    for size in sizes:
        yield _stack([next(iterator) for _ in range(size)])


class _Take:
    def __init__(self, source: IndexedSource, positions: np.ndarray):
        self.source = source
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.source[int(self.positions[i])]


def epoch_order(n: int, seed: int, epoch: int, global_batch: int, devices: int) -> np.ndarray:
    """The training order of one epoch.

    A fresh permutation per (seed, epoch), like DistributedSampler(shuffle=True, seed) with
    set_epoch. Batches are full except the last; its size is cut to a multiple of the device
    count so it can be split evenly (at most devices-1 samples skipped in that epoch).
    """
    perm = np.random.default_rng([seed, epoch, 20240229]).permutation(n)
    full = n // global_batch * global_batch
    tail = (n - full) // devices * devices
    return perm[: full + tail]


def steps_per_epoch(n: int, global_batch: int, devices: int) -> int:
    """Training steps in an epoch of `n` images (every epoch has the same number)."""
    return math.ceil(len(epoch_order(n, 0, 0, global_batch, devices)) / global_batch)


#: At most this many training images are measured for `data.image_size='auto'` (evenly spaced).
AUTO_SAMPLE = 512


def auto_image_size(sizes: Sequence[tuple[int, int]], pixels: int, stride: int) -> tuple[int, int]:
    """(height, width) for images of `sizes` [(h, w), ...]: their median aspect ratio h / w, at
    about `pixels` pixels, each side a multiple of `stride`.

    The short side is rounded first (at least one stride) and the long side then keeps the pixel
    count, so that a very elongated image does not get a much larger input than asked for.
    """
    if not sizes:
        raise ValueError("no image sizes to choose an input size from")
    aspect = float(np.median([h / w for h, w in sizes]))

    def multiple(x: float) -> int:
        return max(stride, int(round(x / stride)) * stride)

    short = multiple(math.sqrt(pixels * min(aspect, 1 / aspect)))
    long = multiple(pixels / short)
    return (long, short) if aspect >= 1 else (short, long)


def resolve_image_size(
    config: ml_collections.ConfigDict, categories: Sequence[CategoryData]
) -> tuple[int, int]:
    """The model input size (height, width): `config.data.image_size`, where 'auto' is measured
    on the training images (up to AUTO_SAMPLE of them, evenly spaced over all categories' train
    splits; never a test image), or the tile with `data.tile.size > 0`."""
    size = config.data.image_size
    if tiling_on(config):  # the model sees tiles
        return (config.data.tile.size, config.data.tile.size)
    if size != AUTO_SIZE:
        return tuple(int(x) for x in size)
    items = [(c, i) for c, cat in enumerate(categories) for i in range(len(cat.train))]
    if len(items) > AUTO_SAMPLE:
        picks = np.linspace(0, len(items) - 1, AUTO_SAMPLE).round().astype(int)
        items = [items[k] for k in picks]
    sizes = [np.asarray(categories[c].train[i]["image"]).shape[:2] for c, i in items]
    chosen = auto_image_size(sizes, config.data.auto_pixels, image_stride(config))
    log.info(
        "data.image_size='auto' -> %s (height, width): median aspect ratio (h/w) %.3f of %d "
        "training images at about %d pixels",
        chosen,
        float(np.median([h / w for h, w in sizes])),
        len(sizes),
        config.data.auto_pixels,
    )
    return chosen


# --------------------------------------------------------------------------- tiling


def scaled_size(config: ml_collections.ConfigDict, image_hw: Sequence[int]) -> tuple[int, int]:
    """The size an image of `image_hw` is scaled to before it is cut into tiles."""
    t = config.data.tile
    return tiling.scaled_size(image_hw, t.scale, t.size)


def record_size(source: Any, index: int) -> tuple[int, int]:
    """(height, width) of a record's image (decodes it)."""
    return tuple(np.asarray(source[index]["image"]).shape[:2])


def eval_image_size(
    config: ml_collections.ConfigDict, sources: Sequence[Any], items: Sequence[Item]
) -> tuple[int, int]:
    """The size `items` are read at for scoring: the model input size, or with tiling the scaled
    size of their images (the most common one if they differ: the others are resized to it, so
    that the maps of a category stack into one array)."""
    if not tiling_on(config):
        return tuple(config.data.image_size)
    sizes = [scaled_size(config, record_size(sources[it.category], it.index)) for it in items]
    if not sizes:
        return tuple(config.data.image_size)
    values, counts = np.unique(np.asarray(sizes), axis=0, return_counts=True)
    common = tuple(int(x) for x in values[int(np.argmax(counts))])
    if len(values) > 1:
        log.info(
            "tiling: %d image sizes among %d images; all scored at the most common one, %s",
            len(values),
            len(sizes),
            common,
        )
    return common


class TiledSource:
    """The tiles of chosen images, for training: records as `IndexedSource(masks=False)`'s, one
    per tile (no mask is ever decoded).

    Every image is scaled (`data.tile.scale`) and cut into `data.tile.size` squares overlapping
    by at least `data.tile.overlap` pixels. The few most recent scaled images are kept, so the
    tiles of one image read in a row decode it once.
    """

    def __init__(self, sources: Sequence[Any], items: Sequence[Item], config, names):
        t = config.data.tile
        self.sources, self.items, self.names = sources, list(items), list(names)
        self.size = int(t.size)
        self.image_size = (self.size, self.size)
        self.entries: list[tuple[int, int, int, tuple[int, int]]] = []  # item, y, x, scaled hw
        for k, item in enumerate(self.items):
            hw = scaled_size(config, record_size(sources[item.category], item.index))
            self.entries += [(k, y, x, hw) for y, x in tiling.tile_boxes(hw, self.size, t.overlap)]
        self._scaled = functools.lru_cache(maxsize=8)(self._read_scaled)

    def __len__(self) -> int:
        return len(self.entries)

    def _read_scaled(self, k: int, hw: tuple[int, int]) -> tuple[np.ndarray, Any]:
        item = self.items[k]
        record = self.sources[item.category][item.index]
        return resize_image(_rgb(record), hw), record

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, y, x, hw = self.entries[i]
        image, record = self._scaled(k, hw)
        s = self.size
        item = self.items[k]
        return {
            "image": np.ascontiguousarray(image[y : y + s, x : x + s]),
            "label": np.int32(record["label"]),
            "category": np.int32(item.category),
            "position": np.int32(i),
            "filename": f"{self.names[item.category]}/{_text(record['filename'])}@{y},{x}",
        }


def training_source(
    config: ml_collections.ConfigDict,
    sources: Sequence[Any],
    items: Sequence[Item],
    names: Sequence[str],
) -> IndexedSource | TiledSource:
    """What the model trains on: the images at the input size, or their tiles (never masks)."""
    if tiling_on(config):
        return TiledSource(sources, items, config, names)
    return IndexedSource(sources, items, config.data.image_size, names, masks=False)


def split_holdout(
    categories: Sequence[CategoryData], fraction: float, seed: int
) -> tuple[list[Item], list[Item]]:
    """(train items, held-out normal items) over all categories' train splits.

    The held-out images (a fixed, seeded `fraction` of each category, at least one when the
    fraction is positive) are never trained on: they set the decision threshold.
    """
    train, held = [], []
    for c, cat in enumerate(categories):
        n = len(cat.train)
        k = int(round(n * fraction)) if fraction > 0 else 0
        if fraction > 0:
            k = min(max(k, 1), n - 1)
        perm = np.random.default_rng([seed, c, 7]).permutation(n)
        held_idx = set(perm[:k].tolist())
        for i in range(n):
            (held if i in held_idx else train).append(Item(c, i))
    return train, held


def test_items(categories: Sequence[CategoryData], c: int) -> list[Item]:
    return [Item(c, i) for i in range(len(categories[c].test))]
