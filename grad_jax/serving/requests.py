"""One predict request of the inspection service: read the multipart upload within its
bounds, check the pixels from the headers, reserve queue room, decode and prepare each image
(at most `max_decodes` at once), wait for the worker's results within the deadline, decide, and
describe each image as JSON. Every refusal is a `guards.Refused` naming the problem and the file.
"""

# No `from __future__ import annotations`: kept like the app's module for FastAPI's types.
import asyncio
import base64
import dataclasses
import math
import time
import warnings
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from grad_jax.inference import heatmap
from grad_jax.inference.decisions import UNKNOWN_CLASS
from grad_jax.inference.scorer import colour_range
from grad_jax.serving import batching, uploads
from grad_jax.serving.guards import RETRY_AFTER_S, BodyTooLarge, BodyTooSlow, Refused, busy
from grad_jax.serving.settings import Settings

_TRUE = ("1", "true", "yes", "on")


def _flag(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in _TRUE


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


async def predict(service: Any, request: Request) -> list[dict[str, Any]]:
    """The results of a predict request, or Refused."""
    start = time.perf_counter()
    not_ready = service.readiness()
    if not_ready is not None:
        raise not_ready
    form, upload = await _read_upload(service, request)
    try:
        return await _score(service, request, upload, start)
    finally:
        await form.close()


async def _score(service: Any, request: Request, upload: _Upload, start: float):
    settings = service.settings
    await run_in_threadpool(_check_pixels, upload.named, service)
    batcher: batching.Batcher = request.app.state.batcher
    deadline = batcher.clock() + settings.deadline_s
    try:
        reservation = batcher.reserve(len(upload.named))
    except batching.QueueFull as err:
        raise busy(
            f"busy: the queue of {service.max_queue} images is full; retry in {RETRY_AFTER_S} s"
        ) from err
    except batching.Stalled as err:
        raise busy(f"the service is stalled: {err}", 5) from err
    except batching.WorkerStopped as err:
        raise Refused(503, f"the service cannot score: {err}") from err
    except batching.BatcherClosed as err:
        raise busy("the service is shutting down", 5) from err
    with reservation:
        images = await _decode_all(service, upload, deadline)
        decoded = time.perf_counter()
        try:
            futures = reservation.submit([image.prepared for image in images], deadline)
        except batching.Stalled as err:
            raise busy(f"the service is stalled: {err}", 5) from err
        except batching.BatcherClosed as err:
            raise Refused(503, f"the service cannot score: {err}") from err
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
            raise Refused(500, _several(failed, len(names)))
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
    """Refused for the images without a result: 504 past the deadline, 503 without a worker,
    500 naming the images the model failed on."""
    late = [
        f"{n}: {o}" for n, o in zip(names, outcomes, strict=True) if isinstance(o, TimeoutError)
    ]
    if late:
        raise Refused(
            504,
            f"no answer within the deadline of {settings.deadline_s:g} s (--deadline_s): "
            + "; ".join(late),
        )
    stopped = [o for o in outcomes if isinstance(o, batching.BatcherClosed)]
    if stopped:
        raise Refused(503, f"the service cannot score: {stopped[0]}")
    failed = [
        f"{n}: the model failed on this image ({type(o).__name__}: {o})"
        for n, o in zip(names, outcomes, strict=True)
        if isinstance(o, BaseException)
    ]
    if failed:
        raise Refused(500, _several(failed, len(names)))


async def _read_upload(service: Any, request: Request):
    """(the form, to close when done; the files and fields of a multipart predict request),
    read within the size and time limits."""
    limits = service.limits
    length = request.headers.get("content-length")
    too_big = (
        f"the request is over the limit of {limits.max_request_bytes:,} bytes "
        f"({limits.max_files} files of at most {limits.max_file_bytes:,} bytes)"
    )
    if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
        raise Refused(413, too_big, Connection="close")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, "send the images as multipart/form-data (one file part per image)")
    timeout = service.settings.receive_timeout_s
    receive = _bounded(request.receive, limits.max_request_bytes, timeout)
    limited = Request(request.scope, receive)
    try:
        form = await limited.form(max_files=limits.max_files, max_fields=16, max_part_size=65536)
    except BodyTooLarge as err:
        raise Refused(413, too_big, Connection="close") from err
    except BodyTooSlow as err:
        raise Refused(
            408,
            f"the request body did not arrive within {timeout:g} s (--receive_timeout_s)",
            Connection="close",
        ) from err
    except Exception as err:  # noqa: BLE001 - starlette raises HTTPException on bad forms
        detail = getattr(err, "detail", None) or str(err)
        raise Refused(400, f"cannot read the form: {detail}") from err
    try:
        files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if not files:
            raise Refused(400, "no image in the request: send one or more file parts")
        category = _category(fields.get("category") or None, service.categories)
        threshold = _threshold(fields.get("threshold", ""))
    except BaseException:
        await form.close()
        raise
    named = [(part.filename or f"file {i + 1}", part) for i, (_, part) in enumerate(files)]
    flags = (_flag(fields.get("overlay")), _flag(fields.get("raw_map")))
    return form, _Upload(named, category, threshold, *flags)


def _bounded(receive, limit: int, timeout_s: float):
    """An ASGI `receive` that raises BodyTooLarge once the body passes `limit` bytes, and
    BodyTooSlow once `timeout_s` have passed since the first call."""
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
            raise BodyTooSlow from None
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
        return message

    return wrapped


def _category(category: str | None, categories: list[str]) -> str | None:
    if category is not None and category not in categories:
        known = ", ".join(categories) or "none (the model stores no classes)"
        raise Refused(400, f"unknown category '{category}'; known: {known}")
    return category


def _threshold(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        threshold = float(text)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise Refused(400, f"threshold must be a finite number, got '{text}'")
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


def _check_pixels(named: list[tuple[str, UploadFile]], service: Any) -> None:
    """Refused (413) for a request whose images have more pixels together than
    `max_request_pixels`, read from their headers: nothing is decoded."""
    settings, limits = service.settings, service.limits
    sizes = [_pixels(part, settings.formats) for _, part in named]
    total = sum(n for n in sizes if n <= limits.max_pixels)  # over it: decode refuses the image
    if total > settings.max_request_pixels:
        raise Refused(
            413,
            f"the {len(named)} images hold {total:,} pixels together, over the limit of "
            f"{settings.max_request_pixels:,} per request (--max_request_pixels): send fewer "
            "or smaller images per request",
        )


async def _decode_all(service: Any, upload: _Upload, deadline: float) -> list[_Decoded]:
    """Every file decoded and prepared, at most `max_decodes` images at once in the server;
    Refused naming every bad file, or 504 if a decode slot is not free before the deadline."""
    images, problems, statuses = [], [], []
    for name, part in upload.named:
        left = deadline - service.clock()
        service.waiting_to_decode += 1
        try:
            async with asyncio.timeout(max(left, 0.001)):  # a slot taken at the timeout is kept
                await service.slots.acquire()
        except TimeoutError:
            raise Refused(
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
        raise Refused(statuses[0], _several(problems, len(upload.named)))
    return images


def _decode_one(service: Any, name: str, part: UploadFile, upload: _Upload) -> _Decoded:
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
