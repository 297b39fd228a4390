"""The one scorer: everything that happens on the host around a model's device program.

A `Scorer` owns, for every way of running a model (`Predictor` on a run folder, the exported
model, the inspection service, the predict command):

- preparing an image: converted as the training data (`grad_jax.data.images.to_rgb8`), then
  resized to the model input, or (tiled models) kept whole and later scaled for its tiles;
- batching and padding: chunks of at most `batch_size` images, padded to the rows the program
  wants (`Program.rows`), so few programs compile;
- running the program, and for tiled models cutting tiles, stitching their raw maps (overlaps
  averaged) and finishing the stitched map (smoothing and image score) exactly as evaluation
  does (`score_tiles`);
- deciding: the class (given, the only one, recognised, or an unknown kind of part), the
  threshold (the caller's for this call, else the class's or the run's; resolved in
  `grad_jax.inference.decisions`), the calibrated value; a non-finite output is an error for
  that image (`Prediction.error`), never a decision;
- the overlay colour rule (`colour_range`).

`Predictor` and `ExportedModel` differ only in where the program comes from.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from PIL import Image

from grad_jax.data import images as image_lib
from grad_jax.data import tiling
from grad_jax.inference.decisions import Decisions, Prediction
from grad_jax.models import scoring
from tfds_mvtec.mvtec_ad import layout

_DECODE_THREADS = 4


# --------------------------------------------------------------------------------------------
# What a model is: its program and the geometry around it.
# --------------------------------------------------------------------------------------------


class Program(Protocol):
    """A device program: uint8 images `[rows, h, w, 3]` at its input size -> numpy outputs
    'raw' and 'smoothed' `[rows, h, w]`, 'score' `[rows]`, 'pooled' `[rows, D]`."""

    def rows(self, n: int) -> int:
        """The batch rows a call with `n` images is padded to."""
        ...

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class ScoringSpec:
    """How images become program inputs, and stitched maps become scores.

    input_size: the program's input (height, width): the model input, or one tile.
    smooth_size, score_pool: the evaluation recipe (finishing stitched maps).
    tile_size: 0 for whole images resized to `input_size`; else images are scaled by
        `tile_scale`, cut into `tile_size` squares overlapping by at least `tile_overlap`.
    """

    input_size: tuple[int, int]
    smooth_size: int
    score_pool: int
    tile_size: int = 0
    tile_overlap: int = 0
    tile_scale: float = 1.0

    @property
    def tiled(self) -> bool:
        return self.tile_size > 0

    @classmethod
    def from_config(cls, config: Any) -> ScoringSpec:
        tile = config.data.get("tile")
        tiled = tile is not None and tile.size > 0
        return cls(
            tuple(int(x) for x in config.data.image_size),
            int(config.eval.smooth_size),
            int(config.eval.score_pool),
            int(tile.size) if tiled else 0,
            int(tile.overlap) if tiled else 0,
            float(tile.scale) if tiled else 1.0,
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ScoringSpec:
        """From an exported model's meta.json (`to_meta` wrote its 'scoring' entry)."""
        s = meta["scoring"]
        return cls(
            tuple(int(x) for x in meta["input"]["image_size"]),
            int(s["smooth_size"]),
            int(s["score_pool"]),
            int(s["tile_size"]),
            int(s["tile_overlap"]),
            float(s["tile_scale"]),
        )

    def to_meta(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("input_size")
        return out

    def tiled_size(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """The size an image of `image_hw` is scaled to before it is cut into tiles."""
        return tiling.scaled_size(image_hw, self.tile_scale, self.tile_size)


# --------------------------------------------------------------------------------------------
# Tiles: cut, score, stitch, finish (shared with evaluation).
# --------------------------------------------------------------------------------------------


def run_in_chunks(program: Program, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The program's outputs for every image of `images` `[n, h, w, 3]`: chunks of at most
    `batch_size`, each zero-padded to `program.rows(len(chunk))`."""
    parts = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        rows = program.rows(len(chunk))
        padded = np.zeros((rows, *chunk.shape[1:]), chunk.dtype)
        padded[: len(chunk)] = chunk
        out = program(padded)
        parts.append({k: np.asarray(v)[: len(chunk)] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _finish(raw, smooth_size: int, score_pool: int):
    smoothed = scoring.smooth(raw, smooth_size)
    return smoothed, scoring.image_scores(smoothed, score_pool)


def finish_maps(raw: np.ndarray, smooth_size: int, score_pool: int):
    """Stitched raw maps `[B, H, W]` -> (smoothed `[B, H, W]`, image scores `[B]`), as numpy."""
    smoothed, score = _finish(np.asarray(raw, np.float32), int(smooth_size), int(score_pool))
    return np.asarray(smoothed), np.asarray(score)


def score_tiles(
    program: Program, images: Sequence[np.ndarray], spec: ScoringSpec, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Whole images (each `[H, W, 3]` uint8, already at its tiling scale, sizes may differ) by
    their tiles: {'raw', 'smoothed': `[H, W]`, 'score': scalar, 'pooled': `[D]` (the mean over
    the image's tiles)} per image, plus every other raw map the program gives ('raw_<kind>'),
    stitched the same way.

    Every tile goes through `program` (in chunks of `batch_size` tiles); an image's tile maps
    are stitched (overlaps averaged), then the stitched map is smoothed and scored as a whole.
    """
    size, overlap = spec.tile_size, spec.tile_overlap
    boxes = [tiling.tile_boxes(image.shape[:2], size, overlap) for image in images]
    tiles = np.concatenate([tiling.cut(im, b, size) for im, b in zip(images, boxes, strict=True)])
    out = run_in_chunks(program, tiles, batch_size)
    results, start = [], 0
    for image, b in zip(images, boxes, strict=True):
        end = start + len(b)
        maps = {
            k: tiling.stitch(v[start:end], b, image.shape[:2])
            for k, v in out.items()
            if k.startswith("raw")
        }
        smoothed, score = finish_maps(maps["raw"][None], spec.smooth_size, spec.score_pool)
        pooled = out["pooled"][start:end].mean(axis=0)
        results.append({**maps, "smoothed": smoothed[0], "score": score[0], "pooled": pooled})
        start = end
    return results


# --------------------------------------------------------------------------------------------
# The scorer.
# --------------------------------------------------------------------------------------------


def check_sequence(images: Any) -> None:
    """Refuse a single `[H, W, C]` array passed where a sequence of images is expected."""
    if isinstance(images, np.ndarray) and images.ndim < 4:
        raise ValueError(
            f"predict() takes a sequence of images; got one array of shape {images.shape} "
            "(wrap a single image in a list)"
        )


def stack_prepared(batch: Sequence[np.ndarray], size: Sequence[int], rows: int) -> np.ndarray:
    """`rows` x `[h, w, 3]` uint8: the prepared images of `batch` (at most `rows` of them, each
    exactly `size`), zero-padded at the end so that one compiled program serves every batch."""
    h, w = size
    x = np.zeros((rows, h, w, 3), np.uint8)
    for i, image in enumerate(batch):
        if image.shape != (h, w, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"prepared image {i}: {image.shape} {image.dtype}, expected ({h}, {w}, 3) uint8"
            )
        x[i] = image
    return x


@dataclasses.dataclass(frozen=True)
class Scored:
    """What the program said of one image, before any decision.

    anomaly_map: the raw map, at the model input size (tiled models: the image's own size).
    """

    score: float
    anomaly_map: np.ndarray
    pooled: np.ndarray


def upsample_map(anomaly_map: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """`[h, w]` float map -> `size` (H, W) with Pillow bilinear."""
    h, w = size
    if anomaly_map.shape == (h, w):
        return np.asarray(anomaly_map, np.float32)
    image = Image.fromarray(np.ascontiguousarray(anomaly_map, np.float32))
    return np.asarray(image.resize((w, h), Image.BILINEAR))


def colour_range(threshold: float | None, maps: Iterable[np.ndarray]) -> tuple[float, float]:
    """The overlay colour scale (vmin, vmax): 0 to twice a positive decision threshold (the
    threshold sits mid-scale, so colours mean the same across images), else the minimum and
    maximum over `maps` (comparable within those maps only)."""
    if threshold is not None and threshold > 0:
        return 0.0, 2.0 * float(threshold)
    low, high = np.inf, -np.inf
    for m in maps:
        low, high = min(low, float(np.min(m))), max(high, float(np.max(m)))
    return (low, high) if low <= high else (0.0, 1.0)


def failure_reason(err: BaseException) -> str:
    if isinstance(err, layout.BadImageError):
        return err.reason
    return str(err) or type(err).__name__


class ScoringFailure(str):
    """The reason `Scorer.iter_files` gives for a file that was read but has no result (the
    model gave a non-finite output: `Prediction.error`), as opposed to a file that could not
    be read (a plain str)."""


Categories = Sequence[str | None] | str | None


class Scorer:
    """A model ready to score images: a device program, its geometry, its decisions.

    program: see `Program`. spec: see `ScoringSpec`. meta: the model's meta (thresholds, class
    centres, class names; see `grad_jax.inference.decisions`). batch_size: images per device
    call (tiled models: tiles per call).
    """

    def __init__(self, program: Program, spec: ScoringSpec, meta: dict[str, Any], batch_size: int):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.program = program
        self.spec = spec
        self.meta = dict(meta or {})
        self.decisions = Decisions(self.meta)
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------------ what the model is

    @property
    def image_size(self) -> tuple[int, int]:
        """The program's input (height, width): the model input, or one tile."""
        return self.spec.input_size

    @property
    def tiled(self) -> bool:
        return self.spec.tiled

    @property
    def categories(self) -> list[str]:
        """The class names the model was trained on (empty for runs that did not store them)."""
        return list(self.decisions.categories)

    @property
    def category_thresholds(self) -> dict[str, float]:
        """Per-class thresholds stored with the model (class -> score), maybe empty."""
        return dict(self.decisions.per_category)

    @property
    def threshold(self) -> float | None:
        """The run-wide threshold stored with the model (None without held-out images)."""
        return self.decisions.run_threshold

    def threshold_for(
        self, category: str | None = None, threshold: float | None = None
    ) -> tuple[float | None, str]:
        """(threshold, where it comes from) for an image of `category` (None: unknown), with
        `threshold` given by the caller (None: the stored ones)."""
        return self.decisions.threshold_for(category, threshold)

    # ------------------------------------------------------------------ images in

    def prepare(self, image: Any, name: str = "<image>") -> np.ndarray:
        """One image (see `grad_jax.data.images.to_rgb8`) -> `[H, W, 3]` uint8: at the model
        input size, or (tiled models) at its own size."""
        return self.prepare_rgb(image_lib.to_rgb8(image, name))

    def prepare_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """An already converted `[H, W, 3]` uint8 image -> what `score_prepared` takes."""
        return rgb if self.tiled else image_lib.resize_image(rgb, self.image_size)

    # ------------------------------------------------------------------ device work

    def score_prepared(self, batch: Sequence[np.ndarray]) -> list[Scored]:
        """Scores and raw maps of prepared images (`prepare`), at most `batch_size` of them.
        Tiled models: each map is at its image's size."""
        n = len(batch)
        if not n:
            return []
        if n > self.batch_size:
            raise ValueError(f"{n} images in one batch; at most batch_size={self.batch_size}")
        if self.tiled:
            scaled = [
                image_lib.resize_image(image, self.spec.tiled_size(image.shape[:2]))
                for image in batch
            ]
            outs = score_tiles(self.program, scaled, self.spec, self.batch_size)
            return [
                Scored(float(o["score"]), upsample_map(o["raw"], image.shape[:2]), o["pooled"])
                for o, image in zip(outs, batch, strict=True)
            ]
        x = stack_prepared(batch, self.image_size, self.program.rows(n))
        out = self.program(x)
        return [
            Scored(float(out["score"][i]), np.asarray(out["raw"][i], np.float32), out["pooled"][i])
            for i in range(n)
        ]

    # ------------------------------------------------------------------ decisions

    def decide(
        self,
        scored: Sequence[Scored],
        categories: Categories = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """Predictions for `scored` images. `categories`: one class for all, one per image, or
        None (the only class, or recognised); `threshold`: decide every image with it (None:
        the stored thresholds of each image's class)."""
        if not scored:
            return []
        return self.decisions.results(
            np.asarray([s.score for s in scored], np.float64),
            [s.anomaly_map for s in scored],
            categories,
            np.stack([np.asarray(s.pooled) for s in scored]),
            threshold,
        )

    def predict_prepared(
        self,
        batch: Sequence[np.ndarray],
        categories: Categories = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """Score and decide at most `batch_size` prepared images (`prepare`)."""
        return self.decide(self.score_prepared(batch), categories, threshold)

    def predict(
        self,
        images: Sequence[Any],
        categories: Categories = None,
        threshold: float | None = None,
    ) -> list[Prediction]:
        """Score a sequence of images (arrays of any size, see `to_rgb8`, or Pillow images).

        A `[N, H, W, C]` array counts as N images; a single image must be wrapped in a list.
        `categories`: one class for all images, one per image, or None (recognised).
        `threshold`: decide every image with it (None: the stored thresholds).
        """
        check_sequence(images)
        images = list(images)
        if categories is not None and not isinstance(categories, str):
            categories = list(categories)
            if len(categories) != len(images):
                raise ValueError(f"{len(categories)} categories given for {len(images)} images")
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = [self.prepare(x, f"image {start + i}") for i, x in enumerate(chunk)]
            cats = categories
            if isinstance(categories, list):
                cats = categories[start : start + len(chunk)]
            out += self.predict_prepared(batch, cats, threshold)
        return out

    # ------------------------------------------------------------------ files

    def iter_files(
        self,
        paths: Iterable[str | os.PathLike],
        category: str | None = None,
        threshold: float | None = None,
        allow_formats: Iterable[str] = (),
    ) -> Iterator[tuple[str, np.ndarray | None, Prediction | None, str | None]]:
        """`(path, original RGB image, prediction, None)` or `(path, None, None, reason)` per
        path, in order: a file that cannot be read (`grad_jax.data.images.read_image`: PNG,
        JPEG, BMP, TIFF and the formats in `allow_formats`, one frame), or whose prediction has
        an `error` (then `reason` is a `ScoringFailure`), is a failure with its reason. Files
        are decoded on background threads, a few batches ahead."""
        paths = [os.fspath(p) for p in paths]
        allow_formats = tuple(allow_formats)

        def load(path: str) -> tuple[np.ndarray, np.ndarray]:
            original = image_lib.read_image(path, allow_formats)
            return original, self.prepare_rgb(original)

        pending: list[tuple[str, Any, str | None]] = []  # (path, images or None, reason)

        def flush() -> Iterator:
            ready = [item[1][1] for item in pending if item[1] is not None]
            predictions = iter(self.predict_prepared(ready, category, threshold))
            for path, images, reason in pending:
                if images is None:
                    yield path, None, None, reason
                    continue
                prediction = next(predictions)
                if prediction.ok:
                    yield path, images[0], prediction, None
                else:  # scored, but without a usable result: a failure naming the file
                    yield path, None, None, ScoringFailure(prediction.error)

        with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
            queue: collections.deque = collections.deque()
            todo = iter(paths)
            for path in todo:
                queue.append((path, pool.submit(load, path)))
                if len(queue) >= 2 * self.batch_size:
                    break
            waiting = 0
            while queue:
                path, future = queue.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    queue.append((nxt, pool.submit(load, nxt)))
                try:
                    pending.append((path, future.result(), None))
                    waiting += 1
                except (layout.BadImageError, ValueError, OSError) as err:
                    pending.append((path, None, failure_reason(err)))
                if waiting == self.batch_size:
                    yield from flush()
                    pending, waiting = [], 0
            if pending:
                yield from flush()

    def predict_files(
        self,
        paths: Iterable[str | os.PathLike],
        category: str | None = None,
        threshold: float | None = None,
        allow_formats: Iterable[str] = (),
    ) -> tuple[list[tuple[str, Prediction]], list[tuple[str, str]]]:
        """`([(path, prediction)], [(path, reason)])`: the scored files, and those that could not
        be read or have no result (see `iter_files`)."""
        ok, failed = [], []
        for path, _, prediction, reason in self.iter_files(
            paths, category, threshold, allow_formats
        ):
            if prediction is None:
                failed.append((path, reason))
            else:
                ok.append((path, prediction))
        return ok, failed
