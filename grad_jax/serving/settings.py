"""The inspection service's own limits and settings (those of one upload are `uploads.Limits`).

Kept apart from `service` so that the command (`grad_jax.serve`) can read the defaults for its
flags before FastAPI is imported. Every bound exists so that an unlucky or hostile client cannot
take the line PC down:

- `max_pixels` (default `DEFAULT_MAX_PIXELS`, 40 MP: more than the industrial cameras this
  serves produce, and less than half of Pillow's own limit of 89 MP, whose worst case, a
  16-bit grey PNG of a few hundred kB, takes about 15 bytes of memory per pixel to decode);
- `max_request_pixels`: the pixels of one request's images together (read from their headers
  before any is decoded);
- `max_decodes`: images decoded, or overlays drawn, at the same time (each decode of a 40 MP
  image may need about 600 MB for a moment);
- `max_queue`: images reserved or waiting for the device (room is reserved before decoding);
- `receive_timeout_s`: the time a client has to send a request's headers, and then its body;
- `deadline_s`: the time a request's images may take from the start of their decoding to their
  scores (504 after it); a device call that runs longer makes the service unhealthy;
- `max_connections`: connections and requests at once (uvicorn's `limit_concurrency`; over it,
  503);
- `shutdown_timeout_s`: on SIGTERM, how long requests in flight have to finish (uvicorn's
  `timeout_graceful_shutdown`);
- `allowed_hosts`: host names the service answers to besides its own address and localhost
  (DNS rebinding protection; '*' allows any, for use behind a proxy that checks them);
- `allow_formats`: image formats accepted besides PNG, JPEG, BMP and TIFF (the formats the
  project trains from; `uploads.decode` runs no other Pillow decoder on uploaded bytes).
"""

from __future__ import annotations

import dataclasses

from grad_jax.serving import uploads
from tfds_mvtec.mvtec_ad import layout

#: The default pixel limit of one image: what a camera produces (see the module docstring).
DEFAULT_MAX_PIXELS = 40_000_000


def default_limits() -> uploads.Limits:
    """The upload limits of the service by default (`uploads.Limits` with `DEFAULT_MAX_PIXELS`)."""
    return uploads.Limits(max_pixels=DEFAULT_MAX_PIXELS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The service's settings; see the module docstring for what each bounds.

    max_wait_ms: the longest wait for a batch to fill. max_queue: None = 4 batches (and at least
    one request's worth of files). warm_up: compile every batch size before reporting healthy.
    """

    max_wait_ms: float = 10.0
    max_queue: int | None = None
    max_request_pixels: int = 4 * DEFAULT_MAX_PIXELS
    max_decodes: int = 2
    receive_timeout_s: float = 60.0
    deadline_s: float = 60.0
    max_connections: int = 32
    shutdown_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
    allow_formats: tuple[str, ...] = ()
    warm_up: bool = True

    @property
    def formats(self) -> tuple[str, ...]:
        """Every format accepted: PNG, JPEG, BMP, TIFF and `allow_formats`."""
        return layout.accepted_formats(self.allow_formats)

    def __post_init__(self):
        positive = (
            "max_request_pixels",
            "max_decodes",
            "receive_timeout_s",
            "deadline_s",
            "max_connections",
            "shutdown_timeout_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        extra = tuple(f.strip().upper() for f in self.allow_formats if f.strip())
        try:
            layout.accepted_formats(extra)
        except ValueError as err:
            raise ValueError(f"allow_formats: {err}") from None
        object.__setattr__(self, "allow_formats", extra)
        hosts = tuple(h.strip().lower().rstrip(".") for h in self.allowed_hosts if h.strip())
        object.__setattr__(self, "allowed_hosts", hosts)
