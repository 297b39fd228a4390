"""The inspection service: an ASGI app (FastAPI) that scores uploaded images with one model.

Routes:

- `POST /v1/predict`: multipart form with one or more image files (any field name) and the
  optional fields `category` (the class to decide with), `threshold` (a number that replaces the
  model's), `overlay=1` (a heat-map overlay PNG in base64) and `raw_map=1` (the raw anomaly map,
  float32 at the model input size, in base64). Answers `{"results": [...]}`, one entry per file
  in upload order, or a 4xx/503 with `{"error": "..."}` naming the problem;
- `GET /v1/model`: the model's metadata and the service's limits;
- `GET /healthz`: `{"status": "ok", ...}` while the worker runs;
- `GET /`: the inspection page (`page.html`, self-contained, works offline).

Requests are decoded on the server's thread pool and their images queued for one worker
(`batching.Batcher`), which scores up to `batch_size` images per device call; a full queue is
answered 503 with Retry-After. A request with a bad file is refused whole (nothing is scored),
with the status from `uploads.UploadError`.

The model is the one scorer (`grad_jax.inference.scorer.Scorer`: a run folder's `Predictor` or an
exported model): the worker runs its device work (`score_prepared`) for the images of several
requests at once, and each request decides its own (`decide`, with its class and threshold).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.
import asyncio
import base64
import contextlib
import dataclasses
import importlib.resources
import logging
import math
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from grad_jax.inference import heatmap
from grad_jax.inference.scorer import Scorer, colour_range
from grad_jax.serving import batching, uploads

log = logging.getLogger(__name__)

PAGE = "page.html"
RETRY_AFTER_S = 1
_TRUE = ("1", "true", "yes", "on")
# The page loads nothing from elsewhere; the policy makes the browser enforce it.
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'"
)


# --------------------------------------------------------------------------------------------
# The app.
# --------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _limited(receive, limit: int):
    """An ASGI `receive` that raises _BodyTooLarge once the body passes `limit` bytes."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return wrapped


def _flag(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in _TRUE


def _finite_or_none(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


class _Refused(Exception):
    """A request answered with an error: HTTP `status`, `{"error": message}`, `headers`."""

    def __init__(self, status: int, message: str, **headers: str):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message}, status_code=self.status, headers=self.headers or None
        )


@dataclasses.dataclass
class _Service:
    """The served model and the service's settings."""

    model: Scorer
    limits: uploads.Limits
    max_wait_ms: float
    max_queue: int
    warm_up: bool

    def __post_init__(self):
        self.batch_size = int(self.model.batch_size)
        self.categories = [str(c) for c in self.model.categories]
        self.image_size = tuple(int(x) for x in self.model.image_size)

    def info(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size),
            "categories": self.categories,
            "batch_size": self.batch_size,
            "max_wait_ms": self.max_wait_ms,
            "max_queue": self.max_queue,
            "limits": dataclasses.asdict(self.limits),
            "meta": self.model.meta,
        }

    def run_batch(self, images: list[np.ndarray]) -> list[Any]:
        """The device work for prepared images of any requests; each request decides its own."""
        return self.model.score_prepared(images)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        if self.warm_up:  # compile before the first request, not during it
            blank = np.zeros((*self.image_size, 3), np.uint8)
            await run_in_threadpool(self.model.predict, [blank])
        app.state.batcher = batching.Batcher(
            self.run_batch,
            self.batch_size,
            self.max_wait_ms / 1000.0,
            self.max_queue,
            name="grad_jax-batcher",
        )
        log.info(
            "serving: batch %d, wait %.3g ms, queue %d",
            self.batch_size, self.max_wait_ms, self.max_queue,
        )  # fmt: skip
        try:
            yield
        finally:
            app.state.batcher.close()


def create_app(
    model: Scorer,
    limits: uploads.Limits | None = None,
    max_wait_ms: float = 10.0,
    max_queue: int | None = None,
    warm_up: bool = True,
) -> FastAPI:
    """The FastAPI app serving `model`; the worker starts and stops with the app's lifespan.

    max_queue: images that may wait for the worker (default: 4 batches, and at least one
    request's worth of files).
    """
    limits = limits or uploads.Limits()
    batch_size = int(model.batch_size)
    if max_queue is None:
        max_queue = max(4 * batch_size, limits.max_files)
    if max_queue < max(batch_size, limits.max_files):
        raise ValueError(
            f"max_queue={max_queue} must hold a whole batch ({batch_size}) and a whole request "
            f"({limits.max_files} files)"
        )
    service = _Service(model, limits, max_wait_ms, max_queue, warm_up)
    page = importlib.resources.files("grad_jax.serving").joinpath(PAGE).read_text(encoding="utf-8")
    # No /docs or /redoc: FastAPI loads those pages from a CDN; /openapi.json stays.
    app = FastAPI(
        title="grad_jax inspection service",
        lifespan=service.lifespan,
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": _CSP})

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        batcher = request.app.state.batcher
        body = {
            "status": "ok" if batcher.alive else "worker stopped",
            "queued": batcher.waiting,
            "batches": batcher.batches,
            "images": batcher.items,
        }
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/v1/model")
    async def model_route() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            return JSONResponse({"results": await _predict(service, request)})
        except _Refused as refused:
            return refused.response()

    return app


@dataclasses.dataclass
class _Upload:
    """What a predict request asks for."""

    named: list[tuple[str, bytes]]  # (file name, encoded bytes) in upload order
    category: str | None
    threshold: float | None
    overlay: bool
    raw_map: bool


async def _predict(service: _Service, request: Request) -> list[dict[str, Any]]:
    """The results of a predict request, or _Refused."""
    start = time.perf_counter()
    upload = await _read_upload(service, request)
    images = await run_in_threadpool(_decode_all, upload.named, service)
    decoded = time.perf_counter()
    batcher: batching.Batcher = request.app.state.batcher
    try:
        futures = batcher.submit([prepared for _, prepared in images])
    except batching.QueueFull as err:
        raise _Refused(
            503,
            f"busy: the queue of {service.max_queue} images is full; retry in {RETRY_AFTER_S} s",
            **{"Retry-After": str(RETRY_AFTER_S)},
        ) from err
    except batching.BatcherClosed as err:
        raise _Refused(503, "the service is shutting down", **{"Retry-After": "5"}) from err
    try:
        outcomes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    except Exception as err:  # noqa: BLE001 - logged by the batcher
        raise _Refused(
            500, f"the model failed on this batch ({type(err).__name__}: {err})"
        ) from err

    def describe():
        predictions = service.model.decide(
            [scored for scored, _ in outcomes], upload.category, upload.threshold
        )
        done = time.perf_counter()
        return [
            _result(name, original, p, info, upload, service.limits, decoded - start, done - start)
            for (name, _), (original, _), p, (_, info) in zip(
                upload.named, images, predictions, outcomes, strict=True
            )
        ]

    return await run_in_threadpool(describe)


async def _read_upload(service: _Service, request: Request) -> _Upload:
    """The files and fields of a multipart predict request, checked against the limits."""
    limits = service.limits
    length = request.headers.get("content-length")
    too_big = (
        f"the request is over the limit of {limits.max_request_bytes:,} bytes "
        f"({limits.max_files} files of at most {limits.max_file_bytes:,} bytes)"
    )
    if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
        raise _Refused(413, too_big)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _Refused(415, "send the images as multipart/form-data (one file part per image)")
    limited = Request(request.scope, _limited(request.receive, limits.max_request_bytes))
    try:
        form = await limited.form(max_files=limits.max_files, max_fields=16, max_part_size=65536)
    except _BodyTooLarge as err:
        raise _Refused(413, too_big) from err
    except Exception as err:  # noqa: BLE001 - starlette raises HTTPException on bad forms
        detail = getattr(err, "detail", None) or str(err)
        raise _Refused(400, f"cannot read the form: {detail}") from err
    try:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if not files:
            raise _Refused(400, "no image in the request: send one or more file parts")
        category = _category(fields.get("category") or None, service.categories)
        threshold = _threshold(fields.get("threshold", ""))
        named = []
        for i, (_, part) in enumerate(files):
            name = part.filename or f"file {i + 1}"
            named.append((name, await part.read(limits.max_file_bytes + 1)))
    finally:
        await form.close()
    flags = (_flag(fields.get("overlay")), _flag(fields.get("raw_map")))
    return _Upload(named, category, threshold, *flags)


def _category(category: str | None, categories: list[str]) -> str | None:
    if category is not None and category not in categories:
        known = ", ".join(categories) or "none (the model stores no classes)"
        raise _Refused(400, f"unknown category '{category}'; known: {known}")
    return category


def _threshold(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        threshold = float(text)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise _Refused(400, f"threshold must be a finite number, got '{text}'")
    return threshold


def _decode_all(named: list[tuple[str, bytes]], service: _Service):
    """[(original, prepared for the model)] of every file; _Refused naming every bad one."""
    images, problems = [], []
    for name, data in named:
        try:
            image = uploads.decode(data, name, service.limits)
            images.append((image, service.model.prepare_rgb(image)))
        except uploads.UploadError as err:
            problems.append(err)
    if problems:
        message = "; ".join(str(p) for p in problems)
        if len(named) > 1:
            message = f"{len(problems)} of {len(named)} files cannot be scored: {message}"
        raise _Refused(problems[0].status, message)
    return images


def _result(name, original, p, info, upload, limits, decode_s, total_s) -> dict[str, Any]:
    """The JSON of one scored image (`p`: its `Prediction`)."""
    anomalous = p.is_anomalous
    result = {
        "file": name,
        "width": int(original.shape[1]),
        "height": int(original.shape[0]),
        "score": float(p.score),
        "calibrated": p.calibrated,
        "category": p.category,
        "decision": None if anomalous is None else ("anomalous" if anomalous else "normal"),
        "threshold": p.threshold,
        "threshold_source": p.threshold_source,
        "time_ms": round(1000 * total_s, 3),
        "timing_ms": {
            "decode": round(1000 * decode_s, 3),
            "queue": round(1000 * info.wait_s, 3),
            "predict": round(1000 * info.run_s, 3),
        },
        "batch": info.size,
    }
    if upload.overlay:
        vmin, vmax = colour_range(p.threshold, [p.anomaly_map])
        image = heatmap.overlay_image(original, p.anomaly_map, vmin, vmax, limits.overlay_side)
        result["overlay_png"] = base64.b64encode(heatmap.png_bytes(image)).decode("ascii")
        result["overlay_range"] = [vmin, vmax]
    if upload.raw_map:
        result["raw_map"] = uploads.encode_map(np.asarray(p.anomaly_map, np.float32))
    return result
