"""What guards the inspection service: errors answered as JSON, the page's security policy,
the Host and Origin checks and the security headers on every response (`Guard`), what
`/v1/model` may show (`public_meta`), and the time a client has to send its request headers
(`http_protocol`). See `grad_jax.serving.service` for the whole request path.
"""

from __future__ import annotations

import base64
import hashlib
import re
import urllib.parse
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

PAGE = "page.html"
RETRY_AFTER_S = 1
#: Host names every service answers to, besides its own address and `allowed_hosts`.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Everything but the page: nothing may be loaded, framed or run.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
#: Meta entries never shown by /v1/model: the training config holds the data root and paths.
PRIVATE_META = ("config",)


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class Refused(Exception):
    """A request answered with an error: HTTP `status`, `{"error": message}`, `headers`."""

    def __init__(self, status: int, message: str, **headers: str):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message}, status_code=self.status, headers=self.headers or None
        )


def busy(message: str, retry_after: int = RETRY_AFTER_S) -> Refused:
    return Refused(503, message, **{"Retry-After": str(retry_after)})


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


class Guard:
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
        csp = self.page_csp if scope.get("path") == "/" else API_CSP.encode()

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

    def _check(self, scope) -> Refused | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None:
            name = host_name(host)
            server = scope.get("server") or ("", None)
            known = {*LOCAL_HOSTS, host_name(str(server[0])), *self.allowed}
            if name not in known and "*" not in self.allowed:
                return Refused(
                    421,
                    f"this service does not answer to the host '{name}' (Host: {host}); it "
                    f"answers to {', '.join(sorted(known - {''}))}: add the name with "
                    "--allowed_hosts if it is yours",
                )
        origin = headers.get("origin")
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            if not self._same_origin(origin, host, scope.get("scheme", "http")):
                return Refused(
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


def _looks_like_path(text: str) -> bool:
    return bool(re.match(r"^(/|~|\\\\|[A-Za-z]:[\\/])", text))


def public_meta(meta: Any) -> Any:
    """The model's meta without anything that reveals the machine's files: no training config
    (data root, data and weights paths), and no string that is an absolute path."""
    if isinstance(meta, dict):
        return {
            str(k): public_meta(v)
            for k, v in meta.items()
            if k not in PRIVATE_META and not (isinstance(v, str) and _looks_like_path(v))
        }
    if isinstance(meta, list | tuple):
        return [public_meta(v) for v in meta if not (isinstance(v, str) and _looks_like_path(v))]
    return meta


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
