"""The inspection service: an ASGI app (FastAPI) that scores uploaded images with one model.

Routes:

- `POST /v1/predict`: multipart form with one or more image files (any field name) and the
  optional fields `category` (the class to decide with), `threshold` (a number that replaces the
  model's), `overlay=1` (a heat-map overlay PNG in base64) and `raw_map=1` (the raw anomaly map,
  float32 at the model input size, in base64). Answers `{"results": [...]}`, one entry per file
  in upload order, or an error status with `{"error": "..."}` naming the problem (and the file);
- `GET /v1/model`: the model's metadata (without local paths) and the service's limits;
- `GET /healthz`: `{"status": "ok", ...}` (200) once every batch size is compiled and while the
  worker serves; 503 with the reason ("warming up", a stopped or stalled worker) otherwise;
- `GET /`: the inspection page (`page.html`, self-contained, works offline).

A predict request goes through these steps, each bounded (`settings.Settings`):

1. its Host header must name this service (421 otherwise), and a POST from a browser must come
   from the service's own page (Origin, 403 otherwise): a web page open on the line PC cannot
   drive the service by DNS rebinding;
2. its body is read within `receive_timeout_s` (408) and `Limits.max_request_bytes` (413);
   files are spooled by the form parser, not held in memory;
3. the images' headers are read: the pixels of all images together must be within
   `max_request_pixels` (413);
4. room for its images is reserved in the worker's queue (503 with Retry-After when full);
5. the images are decoded (PNG, JPEG, BMP, TIFF and `allow_formats` only, each under
   `Limits.max_pixels`, at most `max_decodes` at once on the server's thread pool) and prepared
   exactly as `Predictor` does; a bad file refuses the whole request with the status from
   `uploads.UploadError` (415 for another format), naming the file;
6. the worker (`batching.Batcher`) scores up to `batch_size` images of any requests per device
   call; an image without a result by the request's deadline (`deadline_s`) is answered 504;
   a batch that fails is run again image by image, so only the failing image's request fails
   (500 naming the file);
7. each request decides its own images (`Scorer.decide`, with its class and threshold); an image
   whose score is not finite (`Prediction.error`) is answered 500 naming the file, never as a
   decision; an image of no known class (`category_source` "unknown class") has
   `"category": null` and `"decision": null`.

Every response carries `X-Content-Type-Options: nosniff` and a Content-Security-Policy with
`frame-ancestors 'none'`; the page's policy allows its one inline script and style by their
sha256 only.

The model is the one scorer (`grad_jax.inference.scorer.Scorer`: a run folder's `Predictor` or an
exported model): the worker runs its device work (`score_prepared`) for the images of several
requests at once, and each request decides its own (`decide`, with its class and threshold).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.
import asyncio
import contextlib
import dataclasses
import importlib.resources
import logging
import math
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from grad_jax.inference import heatmap
from grad_jax.inference.scorer import Scorer
from grad_jax.serving import batching, guards, requests, uploads
from grad_jax.serving.settings import Settings, default_limits

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Warm-up and what /v1/model shows.
# --------------------------------------------------------------------------------------------


def warm_up(model: Scorer) -> list[int]:
    """Compile everything a request can run before the first one: the program at every row
    count the service's batches are padded to (`program.rows(n)` for n in 1..batch_size), one
    whole scoring and decision, and the overlay. Returns the row counts run."""
    h, w = model.image_size
    rows = sorted({int(model.program.rows(n)) for n in range(1, model.batch_size + 1)})
    for r in rows:
        model.program(np.zeros((r, h, w, 3), np.uint8))
    blank = np.zeros((h, w, 3), np.uint8)
    (prediction,) = model.decide(model.score_prepared([blank]))
    heatmap.overlay_image(blank, prediction.anomaly_map, 0.0, 1.0, 8)
    return rows


# --------------------------------------------------------------------------------------------
# The app.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Service:
    """The served model, the limits and settings, and the state of warming up."""

    model: Scorer
    limits: uploads.Limits
    settings: Settings
    max_queue: int
    clock: Any

    def __post_init__(self):
        self.batch_size = int(self.model.batch_size)
        self.categories = [str(c) for c in self.model.categories]
        self.image_size = tuple(int(x) for x in self.model.image_size)
        self.state = "warming up" if self.settings.warm_up else "ready"
        self.warmed_rows: list[int] = []
        self.slots: asyncio.Semaphore | None = None  # decodes and overlays at once (per loop)
        self.decoding = 0  # images being decoded now
        self.waiting_to_decode = 0  # images waiting for a decode slot

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "image_size": list(self.image_size),
            "categories": self.categories,
            "batch_size": self.batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": self.max_queue,
            "limits": {
                **dataclasses.asdict(self.limits),
                "max_request_pixels": s.max_request_pixels,
                "max_decodes": s.max_decodes,
                "receive_timeout_s": s.receive_timeout_s,
                "deadline_s": s.deadline_s,
                "formats": list(s.formats),
            },
            "meta": guards.public_meta(self.model.meta),
        }

    def run_batch(self, images: list[np.ndarray]) -> list[Any]:
        """The device work for prepared images of any requests; each request decides its own."""
        return self.model.score_prepared(images)

    def warm(self) -> None:
        """Warm up (on a thread of its own); the state says when the service is ready."""
        try:
            start = time.perf_counter()
            self.warmed_rows = warm_up(self.model)
            log.info(
                "warmed up in %.1f s (batches of %s rows)",
                time.perf_counter() - start, ", ".join(map(str, self.warmed_rows)),
            )  # fmt: skip
            self.state = "ready"
        except Exception as err:  # noqa: BLE001 - reported by /healthz and every request
            log.exception("the warm-up failed")
            self.state = f"warm-up failed ({type(err).__name__}: {err})"

    def readiness(self) -> guards.Refused | None:
        if self.state == "ready":
            return None
        if self.state == "warming up":
            return guards.busy(
                "warming up: the model is being compiled for every batch size; retry"
            )
        return guards.Refused(503, f"the service cannot score: {self.state}")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.slots = asyncio.Semaphore(self.settings.max_decodes)
        app.state.batcher = batching.Batcher(
            self.run_batch,
            self.batch_size,
            self.settings.max_wait_ms / 1000.0,
            self.max_queue,
            name="grad_jax-batcher",
            clock=self.clock,
            stall_s=self.settings.deadline_s,
        )
        if self.settings.warm_up:  # compile before reporting healthy, not during a request
            self.state = "warming up"
            threading.Thread(target=self.warm, name="grad_jax-warm-up", daemon=True).start()
        log.info(
            "serving: batch %d, wait %.3g ms, queue %d, %d decodes at once, deadline %.3g s",
            self.batch_size, self.settings.max_wait_ms, self.max_queue,
            self.settings.max_decodes, self.settings.deadline_s,
        )  # fmt: skip
        try:
            yield
        finally:
            app.state.batcher.close()


def create_app(
    model: Scorer,
    limits: uploads.Limits | None = None,
    settings: Settings | None = None,
    clock=time.monotonic,
    **overrides: Any,
) -> FastAPI:
    """The FastAPI app serving `model`; the worker starts and stops with the app's lifespan.

    limits: what one upload may be (default: `settings.default_limits()`, 40 MP per image).
    settings: the service's bounds (`settings.Settings`); `overrides` replace its fields, e.g.
    `create_app(model, max_wait_ms=5, warm_up=False)`. clock: the batcher's time source.
    """
    limits = limits or default_limits()
    settings = dataclasses.replace(settings or Settings(), **overrides)
    batch_size = int(model.batch_size)
    max_queue = settings.max_queue
    if max_queue is None:
        max_queue = max(4 * batch_size, limits.max_files)
    if max_queue < max(batch_size, limits.max_files):
        raise ValueError(
            f"max_queue={max_queue} must hold a whole batch ({batch_size}) and a whole request "
            f"({limits.max_files} files)"
        )
    service = _Service(model, limits, settings, max_queue, clock)
    page = (
        importlib.resources.files("grad_jax.serving")
        .joinpath(guards.PAGE)
        .read_text(encoding="utf-8")
    )
    # No /docs or /redoc: FastAPI loads those pages from a CDN; /openapi.json stays.
    app = FastAPI(
        title="grad_jax inspection service",
        lifespan=service.lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(
        guards.Guard, allowed_hosts=settings.allowed_hosts, page_csp=guards.page_policy(page)
    )
    app.state.service = service

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        batcher = request.app.state.batcher
        ok, why = batcher.health()
        status = service.state if service.state != "ready" else why
        body = {
            "status": status,
            "queued": batcher.waiting,
            "reserved": batcher.reserved,
            "batches": batcher.batches,
            "images": batcher.items,
            "expired": batcher.expired,
            "decoding": service.decoding,
            "waiting_to_decode": service.waiting_to_decode,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/model")
    async def model_route() -> dict[str, Any]:
        return service.info()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            return JSONResponse({"results": await requests.predict(service, request)})
        except guards.Refused as refused:
            return refused.response()
        except Exception as err:  # noqa: BLE001 - a JSON answer, not a plain-text 500
            log.exception("a predict request failed")
            return guards.Refused(500, f"internal error ({type(err).__name__}: {err})").response()

    return app


# --------------------------------------------------------------------------------------------
# Serving it with uvicorn.
# --------------------------------------------------------------------------------------------


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info"):
    """The uvicorn config that serves `app` within its settings: connections at once
    (`max_connections`), time to send headers (`receive_timeout_s`), graceful shutdown
    (`shutdown_timeout_s`)."""
    import uvicorn

    settings: Settings = app.state.service.settings
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guards.http_protocol(settings.receive_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        lifespan="on",
    )
