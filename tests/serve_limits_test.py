"""`python -m grad_jax.serve` as a real process: its peak memory under the worst requests its
limits allow, and SIGTERM with a request in flight and a client that stopped sending.

Figures (peak memory, shutdown time) are printed:

    python -m pytest tests/serve_limits_test.py -q -s

By default the limits are scaled down (4 MP images, two a request) to keep the test short;
with GRAD_JAX_SERVE_DEFAULT_LIMITS=1 the memory test runs at the command's own defaults (40 MP
images, four a request: the worst requests `python -m grad_jax.serve` accepts; a few minutes).
"""

import concurrent.futures
import io
import json
import os
import pathlib
import re
import signal
import socket
import time

import numpy as np
import pytest
from PIL import Image

from grad_jax.inference.predictor import Predictor
from grad_jax.serving import settings
from tests.serve_load_test import get_json, multipart, read_all, start_server

SHUTDOWN_TIMEOUT_S = 3
if os.environ.get("GRAD_JAX_SERVE_DEFAULT_LIMITS") == "1":
    MAX_PIXELS = settings.DEFAULT_MAX_PIXELS
    PER_REQUEST = settings.Settings().max_request_pixels // MAX_PIXELS
    MAX_DECODES = settings.Settings().max_decodes
    WORST_CLIENTS, WORST_REQUESTS = 4, 2
    FLAGS = ["--batch_size=4"]
else:
    MAX_PIXELS, PER_REQUEST, MAX_DECODES = 4_000_000, 2, 2
    WORST_CLIENTS, WORST_REQUESTS = 8, 2
    FLAGS = [
        "--batch_size=4",
        "--max_files=4",
        f"--max_pixels={MAX_PIXELS}",
        f"--max_request_pixels={PER_REQUEST * MAX_PIXELS}",
        f"--max_decodes={MAX_DECODES}",
    ]
FLAGS.append(f"--shutdown_timeout_s={SHUTDOWN_TIMEOUT_S}")
#: Decoding a 16-bit grey PNG takes about 15.3 bytes a pixel at its peak (the 16-bit pixels,
#: their 8-bit scaling, the RGB copy: 612 MB for 40 MP, measured alone); in the service, with
#: the copies made to prepare the image and the allocator's slack, up to about 18.
DECODE_BYTES_PER_PIXEL = 20
#: Everything else the requests in flight hold (parts being read, prepared images, overlays,
#: maps, the JSON) and the memory the allocator keeps for its threads. Measured at 4 MP:
#: +128 MiB with one decode at a time, +191 MiB with two, +587 MiB with eight.
OTHER_BYTES = 128 * 2**20


def _status(pid: int) -> dict[str, int]:
    """/proc/<pid>/status memory lines in bytes (VmRSS, VmHWM, ...)."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """(process, port, log path) of the command on the tiny run, with FLAGS."""
    log_path = tmp_path_factory.mktemp("serve_limits") / "server.log"
    proc, port = start_server(tiny_run[0], log_path, FLAGS)
    yield proc, port, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _worst_image() -> bytes:
    """The costliest image to decode that the limits allow: 16-bit grey at MAX_PIXELS, small
    as a file (about 57 kB at 4 MP)."""
    side = int(MAX_PIXELS**0.5)
    ramp = (np.arange(side)[None, :] * 7 + np.arange(side)[:, None] * 3).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def test_peak_memory_under_the_worst_allowed_requests(server):
    """Clients send, all at once, requests of 16-bit images at the pixel limit, as many as the
    per-request pixel budget allows, with overlays and raw maps: the server's peak memory grows
    by at most MAX_DECODES decodes of the largest image plus OTHER_BYTES over what it held."""
    proc, port, _ = server
    if not pathlib.Path(f"/proc/{proc.pid}/clear_refs").exists():
        pytest.skip("needs Linux /proc to read and reset the peak memory")
    image = _worst_image()
    files = [(f"{i}.png", image) for i in range(PER_REQUEST)]
    body, content_type = multipart(files, overlay="1", raw_map="1")

    def client(_):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        statuses = []
        try:
            for _ in range(WORST_REQUESTS):
                while True:
                    conn.request("POST", "/v1/predict", body, {"Content-Type": content_type})
                    response = conn.getresponse()
                    answer = json.loads(response.read())
                    if response.status != 503:
                        break
                    time.sleep(float(response.getheader("Retry-After", "1")))
                statuses.append((response.status, answer.get("error")))
        finally:
            conn.close()
        return statuses

    before = _status(proc.pid)["VmRSS"]
    pathlib.Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
    with concurrent.futures.ThreadPoolExecutor(WORST_CLIENTS) as pool:
        answers = [s for statuses in pool.map(client, range(WORST_CLIENTS)) for s in statuses]
    peak = _status(proc.pid)["VmHWM"]
    assert answers == [(200, None)] * (WORST_CLIENTS * WORST_REQUESTS)
    bound = MAX_DECODES * DECODE_BYTES_PER_PIXEL * MAX_PIXELS + OTHER_BYTES
    mib = 2**20
    print(
        f"\nserve peak memory: {before / mib:.0f} MiB before, peak {peak / mib:.0f} MiB "
        f"(+{(peak - before) / mib:.0f} MiB, bound +{bound / mib:.0f} MiB) for "
        f"{WORST_CLIENTS} clients x {WORST_REQUESTS} requests of {PER_REQUEST} x {MAX_PIXELS:,} "
        "px 16-bit"
    )
    assert peak - before <= bound


def test_sigterm_answers_the_request_in_flight_and_exits_in_time(server, tiny_run):
    """A request whose body is half sent when SIGTERM arrives is answered (200, Predictor's
    score); a client that sent 20 bytes of its body and stopped does not hold the server past
    --shutdown_timeout_s."""
    proc, port, log_path = server
    rgb = np.asarray(Image.open(sorted((tiny_run[1] / "test").rglob("*.png"))[0]).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    body, content_type = multipart([("part.png", buffer.getvalue())])
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    want = Predictor.from_workdir(tiny_run[0], batch_size=4).predict([rgb])[0].score
    assert get_json(port, "/healthz")[0] == 200

    stalled = socket.create_connection(("127.0.0.1", port), timeout=60)
    stalled.sendall(head + body[:20])  # and never more
    in_flight = socket.create_connection(("127.0.0.1", port), timeout=60)
    in_flight.sendall(head + body[: len(body) // 2])
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    end = start + 60
    while "Shutting down" not in log_path.read_text(encoding="utf-8", errors="replace"):
        assert time.monotonic() < end and proc.poll() is None, "the server did not take SIGTERM"
        time.sleep(0.05)
    in_flight.sendall(body[len(body) // 2 :])
    answer = read_all(in_flight)
    code = proc.wait(SHUTDOWN_TIMEOUT_S + 30)
    took = time.monotonic() - start
    read_all(stalled)  # closed by the server
    stalled.close()
    in_flight.close()

    head_end = answer.index(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]
    (result,) = json.loads(answer[head_end + 4 :])["results"]
    assert result["score"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert re.search(r"Cancel 1 running task\(s\), timeout graceful shutdown exceeded", log), log
    print(f"\nserve shutdown: SIGTERM to exit {took:.2f} s (exit status {code})")
