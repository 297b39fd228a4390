"""`Predictor`: a trained run folder ready to score images from Python.

    from grad_jax.inference.predictor import Predictor   # also importable from grad_jax.predict

    predictor = Predictor.from_workdir("runs/bottle")
    for p in predictor.predict([image_a, image_b]):  # numpy arrays of any size
        print(p.score, p.is_anomalous, p.anomaly_map.shape)
    ok, failed = predictor.predict_files(["a.png", "b.jpg"])

Images are converted as the training data (`grad_jax.data.images`), scored by the jitted predict
function (`grad_jax.inference.device_program`), and decided per class
(`grad_jax.inference.decisions`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from grad_jax.config import tiling_on
from grad_jax.data import images as image_lib
from grad_jax.data import tiling
from grad_jax.data.images import read_image, to_rgb8
from grad_jax.errors import UsageError
from grad_jax.inference import device_program
from grad_jax.inference.decisions import Decisions, Prediction
from grad_jax.runs import run_folder
from tfds_mvtec.mvtec_ad import layout

_DECODE_THREADS = 4


def failure_reason(err: BaseException) -> str:
    if isinstance(err, layout.BadImageError):
        return err.reason
    return str(err) or type(err).__name__


def upsample_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`[h, w]` float map -> `size` (H, W) with Pillow bilinear."""
    h, w = size
    if anomaly_map.shape == (h, w):
        return anomaly_map.astype(np.float32)
    image = Image.fromarray(np.ascontiguousarray(anomaly_map, np.float32))
    return np.asarray(image.resize((w, h), Image.BILINEAR))


class Predictor:
    """A trained model ready to score images; one compiled program for batches of `batch_size`.

    Every batch sent to the device is padded once, to `batch_size` rounded up to a multiple of
    the device count (`rows`), so however many images are scored, the predict function is
    compiled once and splits evenly over the devices. Decisions follow
    `grad_jax.inference.decisions`: per class (given, or recognised from the image) with the
    thresholds, held-out normal scores and class centres stored with the run (`meta`);
    `threshold`, when set, overrides them all.
    """

    def __init__(
        self,
        variables: Any,
        config: Any,
        threshold: float | None = None,
        batch_size: int = 16,
        meta: dict[str, Any] | None = None,
        step: int | None = None,
        workdir: str | None = None,
    ):
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be at least 1, got {batch_size}")
        self.config = config
        self.batch_size = int(batch_size)
        devices = jax.device_count()
        self.rows = -(-self.batch_size // devices) * devices
        self.meta = dict(meta or {})
        self.decisions = Decisions(self.meta)
        if threshold is not None:
            self.decisions.fix_threshold(threshold)
        self.step = step
        self.workdir = workdir
        self.image_size: tuple[int, int] = tuple(int(x) for x in config.data.image_size)
        self._predict_fn: Callable[[np.ndarray], dict[str, np.ndarray]] = (
            device_program.make_predict_fn(variables, config)
        )
        # Tiling: images keep their size here; each is scaled, cut, scored and stitched.
        self.tiled = tiling_on(config)
        if self.tiled:
            self._tiled_fn = device_program.make_tiled_predict_fn(self._predict_fn, config)

    @classmethod
    def from_workdir(
        cls, workdir: str | os.PathLike, step: int | None = None, batch_size: int = 16
    ) -> Predictor:
        """The model of a run folder (its latest readable checkpoint, or checkpoint `step`).

        Raises RunFolderError (a FileNotFoundError) if `workdir` is not a run folder or has no
        such checkpoint.
        """
        workdir = os.fspath(workdir)
        trained = run_folder.load_trained(workdir, step=None if step is None else int(step))
        return cls(
            trained.variables,
            trained.config,
            batch_size=batch_size,
            meta=trained.meta,
            step=trained.step,
            workdir=workdir,
        )

    @property
    def threshold(self) -> float | None:
        """The run-wide threshold: the one fixed by the caller if any, else the run's (or None).

        Assigning it decides every image with that value (None: no decisions);
        `decisions.use_stored_thresholds()` returns to the stored per-class thresholds.
        """
        d = self.decisions
        return d.fixed_threshold if d.fixed else d.run_threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self.decisions.fix_threshold(value)

    @property
    def categories(self) -> list[str]:
        """The class names the model was trained on (empty for runs that did not store them)."""
        return list(self.decisions.categories)

    @property
    def category_thresholds(self) -> dict[str, float]:
        """Per-category thresholds stored with the run (category name -> score), maybe empty."""
        return dict(self.decisions.per_category)

    def prepare(self, image: Any, name: str = "<image>") -> np.ndarray:
        """One image (see `to_rgb8`) -> `[H, W, 3]` uint8 at the model input size (with tiling:
        at its own size; `predict_prepared` cuts it)."""
        return self._model_input(to_rgb8(image, name))

    def _model_input(self, rgb: np.ndarray) -> np.ndarray:
        return rgb if self.tiled else image_lib.resize_image(rgb, self.image_size)

    def decide(self, score: float) -> bool | None:
        """`score` against the run-wide threshold (see `threshold`)."""
        threshold = self.threshold
        return None if threshold is None else bool(score >= threshold)

    def predict(
        self,
        images: Sequence[Any],
        categories: Sequence[str | None] | str | None = None,
    ) -> list[Prediction]:
        """Score a sequence of images (arrays of any size, see `to_rgb8`, or Pillow images).

        A `[N, H, W, C]` array counts as N images; a single image must be wrapped in a list.
        `categories`: one class for all images, one per image, or None (recognised).
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
        if self.tiled:
            return self._predict_tiled(batch, categories)
        result = self._predict_fn(image_lib.stack_prepared(batch, self.image_size, self.rows))
        return self.decisions.results(
            np.asarray(result["score"])[:n],
            np.asarray(result["raw"])[:n],
            categories,
            np.asarray(result["pooled"])[:n],
        )

    def _predict_tiled(
        self, batch: Sequence[np.ndarray], categories: Sequence[str | None] | str | None
    ) -> list[Prediction]:
        """Images at their own sizes, one at a time: scaled, tiled, stitched; each map back at
        its image's original size."""
        scores, maps, pooled = [], [], []
        for image in batch:
            original = image.shape[:2]
            tile = self.config.data.tile
            scaled = image_lib.resize_image(
                image, tiling.scaled_size(original, tile.scale, tile.size)
            )
            result = self._tiled_fn(scaled[None])
            scores.append(float(result["score"][0]))
            maps.append(upsample_map(np.asarray(result["raw"][0], np.float32), original))
            pooled.append(result["pooled"][0])
        return self.decisions.results(np.asarray(scores), maps, categories, np.stack(pooled))

    def iter_files(
        self, paths: Iterable[str | os.PathLike], category: str | None = None
    ) -> Iterator[tuple[str, np.ndarray | None, Prediction | None, str | None]]:
        """`(path, original RGB image, prediction, None)` or `(path, None, None, reason)` per path,
        in order. Files are decoded on background threads, a few batches ahead."""
        paths = [os.fspath(p) for p in paths]

        def load(path: str) -> tuple[np.ndarray, np.ndarray]:
            original = read_image(path)
            return original, self._model_input(original)

        pending: list[tuple[str, Any, str | None]] = []  # (path, images or None, reason)
        waiting = 0

        def flush():
            ready = [item[1] for item in pending if item[1] is not None]
            predictions = iter(self.predict_prepared([r for _, r in ready], category))
            for path, images, reason in pending:
                if images is None:
                    yield path, None, None, reason
                else:
                    yield path, images[0], next(predictions), None

        with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
            queue: collections.deque = collections.deque()
            todo = iter(paths)
            lookahead = 2 * self.batch_size
            for path in todo:
                queue.append((path, pool.submit(load, path)))
                if len(queue) >= lookahead:
                    break
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
        self, paths: Iterable[str | os.PathLike]
    ) -> tuple[list[tuple[str, Prediction]], list[tuple[str, str]]]:
        """`([(path, prediction)], [(path, reason)])`: the scored files and the unreadable ones."""
        ok, failed = [], []
        for path, _, prediction, reason in self.iter_files(paths):
            if prediction is None:
                failed.append((path, reason))
            else:
                ok.append((path, prediction))
        return ok, failed
