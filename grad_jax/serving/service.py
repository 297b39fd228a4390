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
import base64
import contextlib
import dataclasses
import hashlib
import importlib.resources
import logging
import math
import re
import threading
import time
import urllib.parse
import warnings
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile

from grad_jax.inference import heatmap
from grad_jax.inference.decisions import UNKNOWN_CLASS
from grad_jax.inference.scorer import Scorer, colour_range
from grad_jax.serving import batching, uploads
from grad_jax.serving.settings import Settings, default_limits

log = logging.getLogger(__name__)

PAGE = "page.html"
RETRY_AFTER_S = 1
_TRUE = ("1", "true", "yes", "on")
#: Host names every service answers to, besides its own address and `allowed_hosts`.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Everything but the page: nothing may be loaded, framed or run.
_API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
#: Meta entries never shown by /v1/model: the training config holds the data root and paths.
_PRIVATE_META = ("config",)


# --------------------------------------------------------------------------------------------
# Errors answered as JSON.
# --------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _Refused(Exception):
    """A request answered with an error: HTTP `status`, `{"error": message}`, `headers`."""

    def __init__(self, status: int, message: str, **headers: str):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message}, status_code=self.status, headers=self.headers or None
        )


def _busy(message: str, retry_after: int = RETRY_AFTER_S) -> _Refused:
    return _Refused(503, message, **{"Retry-After": str(retry_after)})


# --------------------------------------------------------------------------------------------
# The page's security policy, Host and Origin checks, security headers.
# --------------------------------------------------------------------------------------------


def _inline_hashes(page: str, tag: str) -> list[str]:
    """CSP sources (`'sha256-...'`) for every inline `<tag>` element of `page`."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
    if not blocks:
        raise ValueError(f"{PAGE} has no inline <{tag}>")
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() + "'"
        for b in blocks
    ]


def page_policy(page: str) -> str:
    """The page's Content-Security-Policy: its own inline script and style (by their sha256)
    and nothing from elsewhere; images from data: URLs (the overlays); no framing."""
    scripts = " ".join(_inline_hashes(page, "script"))
    styles = " ".join(_inline_hashes(page, "style"))
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def host_name(value: str) -> str:
    """The host of a Host header or netloc (`name[:port]`, `[v6]:port`), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit():
        value = name
    return value.rstrip(".")


def _netloc(host: str, port: int | None, scheme: str) -> tuple[str, int]:
    default = 443 if scheme in ("https", "wss") else 80
    return host_name(host), port if port is not None else default


class _Guard:
    """ASGI middleware: the Host allow-list, same-origin POSTs, and the security headers that
    every response (errors included) carries."""

    def __init__(self, app, allowed_hosts: tuple[str, ...], page_csp: str):
        self.app = app
        self.allowed = tuple(allowed_hosts)
        self.page_csp = page_csp.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = self.page_csp if scope.get("path") == "/" else _API_CSP.encode()

        async def secured(message):
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"content-security-policy", b"x-content-type-options")
                ]
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"content-security-policy", csp),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        refused = self._check(scope)
        if refused is not None:
            await refused.response()(scope, receive, secured)
            return
        await self.app(scope, receive, secured)

    def _check(self, scope) -> _Refused | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None:
            name = host_name(host)
            server = scope.get("server") or ("", None)
            known = {*LOCAL_HOSTS, host_name(str(server[0])), *self.allowed}
            if name not in known and "*" not in self.allowed:
                return _Refused(
                    421,
                    f"this service does not answer to the host '{name}' (Host: {host}); it "
                    f"answers to {', '.join(sorted(known - {''}))}: add the name with "
                    "--allowed_hosts if it is yours",
                )
        origin = headers.get("origin")
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            if not self._same_origin(origin, host, scope.get("scheme", "http")):
                return _Refused(
                    403,
                    f"a {scope.get('method')} from the page of another site ({origin}) is "
                    f"refused: only this service's own page (http://{host}) may send one",
                )
        return None

    @staticmethod
    def _same_origin(origin: str, host: str | None, scheme: str) -> bool:
        if host is None or origin == "null":
            return False
        try:
            parsed = urllib.parse.urlsplit(origin)
            theirs = _netloc(parsed.hostname or "", parsed.port, parsed.scheme)
        except ValueError:
            return False
        port = host.rpartition(":")[2] if not host.endswith("]") else ""
        ours = _netloc(host, int(port) if port.isdigit() else None, parsed.scheme or scheme)
        return theirs == ours


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


def _looks_like_path(text: str) -> bool:
    return bool(re.match(r"^(/|~|\\\\|[A-Za-z]:[\\/])", text))


def public_meta(meta: Any) -> Any:
    """The model's meta without anything that reveals the machine's files: no training config
    (data root, data and weights paths), and no string that is an absolute path."""
    if isinstance(meta, dict):
        return {
            str(k): public_meta(v)
            for k, v in meta.items()
            if k not in _PRIVATE_META and not (isinstance(v, str) and _looks_like_path(v))
        }
    if isinstance(meta, list | tuple):
        return [public_meta(v) for v in meta if not (isinstance(v, str) and _looks_like_path(v))]
    return meta


# --------------------------------------------------------------------------------------------
# The app.
# --------------------------------------------------------------------------------------------


def _flag(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in _TRUE


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
            "meta": public_meta(self.model.meta),
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

    def readiness(self) -> _Refused | None:
        if self.state == "ready":
            return None
        if self.state == "warming up":
            return _busy("warming up: the model is being compiled for every batch size; retry")
        return _Refused(503, f"the service cannot score: {self.state}")

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
    page = importlib.resources.files("grad_jax.serving").joinpath(PAGE).read_text(encoding="utf-8")
    # No /docs or /redoc: FastAPI loads those pages from a CDN; /openapi.json stays.
    app = FastAPI(
        title="grad_jax inspection service",
        lifespan=service.lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(_Guard, allowed_hosts=settings.allowed_hosts, page_csp=page_policy(page))
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
            return JSONResponse({"results": await _predict(service, request)})
        except _Refused as refused:
            return refused.response()
        except Exception as err:  # noqa: BLE001 - a JSON answer, not a plain-text 500
            log.exception("a predict request failed")
            return _Refused(500, f"internal error ({type(err).__name__}: {err})").response()

    return app


# --------------------------------------------------------------------------------------------
# Serving it with uvicorn.
# --------------------------------------------------------------------------------------------


def http_protocol(receive_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive within
    `receive_timeout_s` (after it opens, or after the first byte of a next request), so idle or
    trickling connections cannot hold the `max_connections` slots (the body has its own bound,
    in the app)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._headers_timer = None
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._headers_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._headers_timer = self.loop.call_later(receive_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
                self._headers_timer = None

        def _too_slow(self) -> None:
            self._headers_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


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
        http=http_protocol(settings.receive_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        lifespan="on",
    )


# --------------------------------------------------------------------------------------------
# A predict request.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Upload:
    """What a predict request asks for; `named` files stay spooled until decoded."""

    named: list[tuple[str, UploadFile]]  # (file name, its part) in upload order
    category: str | None
    threshold: float | None
    overlay: bool
    raw_map: bool


@dataclasses.dataclass
class _Decoded:
    """One decoded image: its size, what the model takes, and (for an overlay) the image
    shrunk to the overlay's size."""

    width: int
    height: int
    prepared: np.ndarray
    shown: np.ndarray | None


async def _predict(service: _Service, request: Request) -> list[dict[str, Any]]:
    """The results of a predict request, or _Refused."""
    start = time.perf_counter()
    not_ready = service.readiness()
    if not_ready is not None:
        raise not_ready
    form, upload = await _read_upload(service, request)
    try:
        return await _score(service, request, upload, start)
    finally:
        await form.close()


async def _score(service: _Service, request: Request, upload: _Upload, start: float):
    settings = service.settings
    await run_in_threadpool(_check_pixels, upload.named, service)
    batcher: batching.Batcher = request.app.state.batcher
    deadline = batcher.clock() + settings.deadline_s
    try:
        reservation = batcher.reserve(len(upload.named))
    except batching.QueueFull as err:
        raise _busy(
            f"busy: the queue of {service.max_queue} images is full; retry in {RETRY_AFTER_S} s"
        ) from err
    except batching.Stalled as err:
        raise _busy(f"the service is stalled: {err}", 5) from err
    except batching.WorkerStopped as err:
        raise _Refused(503, f"the service cannot score: {err}") from err
    except batching.BatcherClosed as err:
        raise _busy("the service is shutting down", 5) from err
    with reservation:
        images = await _decode_all(service, upload, deadline)
        decoded = time.perf_counter()
        try:
            futures = reservation.submit([image.prepared for image in images], deadline)
        except batching.Stalled as err:
            raise _busy(f"the service is stalled: {err}", 5) from err
        except batching.BatcherClosed as err:
            raise _Refused(503, f"the service cannot score: {err}") from err
    outcomes = await asyncio.gather(
        *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
    )
    names = [name for name, _ in upload.named]
    _check_outcomes(names, outcomes, settings)

    def describe() -> list[dict[str, Any]]:
        predictions = service.model.decide(
            [scored for scored, _ in outcomes], upload.category, upload.threshold
        )
        failed = [
            f"{name}: {p.error}" for name, p in zip(names, predictions, strict=True) if p.error
        ]
        if failed:
            raise _Refused(500, _several(failed, len(names)))
        done = time.perf_counter()
        return [
            _result(name, image, p, info, upload, service.limits, decoded - start, done - start)
            for name, image, p, (_, info) in zip(names, images, predictions, outcomes, strict=True)
        ]

    if not upload.overlay:
        return await run_in_threadpool(describe)
    async with service.slots:  # overlays are heavy host work too
        return await run_in_threadpool(describe)


def _several(problems: list[str], n: int) -> str:
    message = "; ".join(problems)
    return f"{len(problems)} of {n} files cannot be scored: {message}" if n > 1 else message


def _check_outcomes(names: list[str], outcomes: list[Any], settings: Settings) -> None:
    """_Refused for the images without a result: 504 past the deadline, 503 without a worker,
    500 naming the images the model failed on."""
    late = [
        f"{n}: {o}" for n, o in zip(names, outcomes, strict=True) if isinstance(o, TimeoutError)
    ]
    if late:
        raise _Refused(
            504,
            f"no answer within the deadline of {settings.deadline_s:g} s (--deadline_s): "
            + "; ".join(late),
        )
    stopped = [o for o in outcomes if isinstance(o, batching.BatcherClosed)]
    if stopped:
        raise _Refused(503, f"the service cannot score: {stopped[0]}")
    failed = [
        f"{n}: the model failed on this image ({type(o).__name__}: {o})"
        for n, o in zip(names, outcomes, strict=True)
        if isinstance(o, BaseException)
    ]
    if failed:
        raise _Refused(500, _several(failed, len(names)))


async def _read_upload(service: _Service, request: Request):
    """(the form, to close when done; the files and fields of a multipart predict request),
    read within the size and time limits."""
    limits = service.limits
    length = request.headers.get("content-length")
    too_big = (
        f"the request is over the limit of {limits.max_request_bytes:,} bytes "
        f"({limits.max_files} files of at most {limits.max_file_bytes:,} bytes)"
    )
    if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
        raise _Refused(413, too_big, Connection="close")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _Refused(415, "send the images as multipart/form-data (one file part per image)")
    timeout = service.settings.receive_timeout_s
    receive = _bounded(request.receive, limits.max_request_bytes, timeout)
    limited = Request(request.scope, receive)
    try:
        form = await limited.form(max_files=limits.max_files, max_fields=16, max_part_size=65536)
    except _BodyTooLarge as err:
        raise _Refused(413, too_big, Connection="close") from err
    except _BodyTooSlow as err:
        raise _Refused(
            408,
            f"the request body did not arrive within {timeout:g} s (--receive_timeout_s)",
            Connection="close",
        ) from err
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
    except BaseException:
        await form.close()
        raise
    named = [(part.filename or f"file {i + 1}", part) for i, (_, part) in enumerate(files)]
    flags = (_flag(fields.get("overlay")), _flag(fields.get("raw_map")))
    return form, _Upload(named, category, threshold, *flags)


def _bounded(receive, limit: int, timeout_s: float):
    """An ASGI `receive` that raises _BodyTooLarge once the body passes `limit` bytes, and
    _BodyTooSlow once `timeout_s` have passed since the first call."""
    seen = 0
    end: float | None = None

    async def wrapped():
        nonlocal seen, end
        loop = asyncio.get_running_loop()
        if end is None:
            end = loop.time() + timeout_s
        try:
            message = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))
        except TimeoutError:
            raise _BodyTooSlow from None
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return wrapped


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


def _pixels(part: UploadFile, formats: tuple[str, ...]) -> int:
    """Width x height from the file's header alone (only `formats` are tried); 0 when it cannot
    be read, for `uploads.decode` to name the problem."""
    part.file.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(part.file, formats=formats) as image:
                return image.size[0] * image.size[1]
        except Exception:  # noqa: BLE001 - uploads.decode names the problem
            return 0


def _check_pixels(named: list[tuple[str, UploadFile]], service: _Service) -> None:
    """_Refused (413) for a request whose images have more pixels together than
    `max_request_pixels`, read from their headers: nothing is decoded."""
    settings, limits = service.settings, service.limits
    sizes = [_pixels(part, settings.formats) for _, part in named]
    total = sum(n for n in sizes if n <= limits.max_pixels)  # over it: decode refuses the image
    if total > settings.max_request_pixels:
        raise _Refused(
            413,
            f"the {len(named)} images hold {total:,} pixels together, over the limit of "
            f"{settings.max_request_pixels:,} per request (--max_request_pixels): send fewer "
            "or smaller images per request",
        )


async def _decode_all(service: _Service, upload: _Upload, deadline: float) -> list[_Decoded]:
    """Every file decoded and prepared, at most `max_decodes` images at once in the server;
    _Refused naming every bad file, or 504 if a decode slot is not free before the deadline."""
    images, problems, statuses = [], [], []
    for name, part in upload.named:
        left = deadline - service.clock()
        service.waiting_to_decode += 1
        try:
            async with asyncio.timeout(max(left, 0.001)):  # a slot taken at the timeout is kept
                await service.slots.acquire()
        except TimeoutError:
            raise _Refused(
                504,
                f"no answer within the deadline of {service.settings.deadline_s:g} s "
                f"(--deadline_s): {name} waited for one of the {service.settings.max_decodes} "
                "decode slots",
            ) from None
        finally:
            service.waiting_to_decode -= 1
        service.decoding += 1
        try:
            images.append(await run_in_threadpool(_decode_one, service, name, part, upload))
        except uploads.UploadError as err:
            problems.append(str(err))
            statuses.append(err.status)
        finally:
            service.decoding -= 1
            service.slots.release()
    if problems:
        raise _Refused(statuses[0], _several(problems, len(upload.named)))
    return images


def _decode_one(service: _Service, name: str, part: UploadFile, upload: _Upload) -> _Decoded:
    limits = service.limits
    part.file.seek(0)
    data = part.file.read(limits.max_file_bytes + 1)
    original = uploads.decode(data, name, limits, service.settings.allow_formats)
    del data
    h, w = original.shape[:2]
    shown = _shrunk(original, limits.overlay_side) if upload.overlay else None
    return _Decoded(w, h, service.model.prepare_rgb(original), shown)


def _shrunk(image: np.ndarray, side: int) -> np.ndarray:
    """`image` at the size `heatmap.overlay_image` shows it with `max_side=side`."""
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _result(name, image: _Decoded, p, info, upload, limits, decode_s, total_s) -> dict[str, Any]:
    """The JSON of one scored image (`p`: its `Prediction`)."""
    unknown = p.category is None and p.category_source == UNKNOWN_CLASS
    anomalous = None if unknown else p.is_anomalous
    result = {
        "file": name,
        "width": image.width,
        "height": image.height,
        "score": float(p.score),
        "calibrated": p.calibrated,
        "category": p.category,
        "category_source": p.category_source,
        "decision": None if anomalous is None else ("anomalous" if anomalous else "normal"),
        "threshold": None if unknown else p.threshold,
        "threshold_source": p.threshold_source,
        "false_alarm_bound": None if unknown else p.false_alarm_bound,
        "time_ms": round(1000 * total_s, 3),
        "timing_ms": {
            "decode": round(1000 * decode_s, 3),
            "queue": round(1000 * info.wait_s, 3),
            "predict": round(1000 * info.run_s, 3),
        },
        "batch": info.size,
    }
    if upload.overlay:
        vmin, vmax = colour_range(result["threshold"], [p.anomaly_map])
        shown = heatmap.overlay_image(image.shown, p.anomaly_map, vmin, vmax, limits.overlay_side)
        result["overlay_png"] = base64.b64encode(heatmap.png_bytes(shown)).decode("ascii")
        result["overlay_range"] = [vmin, vmax]
    if upload.raw_map:
        result["raw_map"] = uploads.encode_map(np.asarray(p.anomaly_map, np.float32))
    return result
