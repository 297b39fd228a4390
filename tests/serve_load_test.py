"""`python -m grad_jax.serve` as a real server on loopback, under load, with hostile clients.

8 clients send 50 requests each, concurrently, over keep-alive connections: images of mixed
sizes, formats and modes, some requests with two images, and a few bad files. Meanwhile hostile
clients send, over and over: a request line that stops after 20 bytes, headers and 20 bytes of
a body that never comes, a Content-Length over the limit, a file over the byte limit, a
decompression bomb, images over the per-request pixel budget, a broken multipart body, an
image format that is not accepted, a foreign Host header and a POST from another site's page.

Every good image must come back with Predictor's score, every bad or hostile request with the
4xx it deserves (or, for a slow client, a closed connection), every request with an answer (503s
are retried after Retry-After and counted), no 5xx, and the server's log must hold no error.
The client-side latency (p50, p95) is printed and written to load.json:

    python -m pytest tests/serve_load_test.py -q -s
"""

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from grad_jax.inference.predictor import Predictor
from tests.conftest import ROOT, bomb_png
from tfds_mvtec.mvtec_ad import layout

CLIENTS, REQUESTS = 8, 50
BATCH = 8
START_TIMEOUT_S = 300
RECEIVE_TIMEOUT_S = 3
#: The load server's limits: small enough for hostile requests to pass them cheaply.
LOAD_FLAGS = [
    f"--batch_size={BATCH}",
    f"--receive_timeout_s={RECEIVE_TIMEOUT_S}",
    "--max_pixels=2000000",
    "--max_request_pixels=3000000",
]
HOSTILE_ROUNDS = 3


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _inputs(category) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """`(good, bad)`: `{name: bytes}` of images in several sizes and formats, and bad files."""
    good = {}
    sizes = [(23, 31), (64, 64), (80, 80), (120, 200), (333, 250), (480, 640)]
    paths = sorted((category / "test").rglob("*.png"))
    for i, path in enumerate(paths):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        h, w = sizes[i % len(sizes)]
        resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        good[f"{path.parent.name}_{path.stem}_{w}x{h}.png"] = _encode(resized, "PNG")
        gray = np.asarray(Image.fromarray(resized).convert("L"))
        good[f"{path.parent.name}_{path.stem}_gray.jpg"] = _encode(gray, "JPEG", quality=85)
    big = good[max(good, key=lambda n: len(good[n]))]
    bad = {
        "empty.png": b"",
        "notes.png": b"this is a text file\n",
        "cut.png": big[: len(big) // 3],
    }
    return good, bad


def multipart(files: list[tuple[str, bytes]], **fields: str) -> tuple[bytes, str]:
    """A multipart/form-data body of `files` (field "file") and `fields`; its content type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def get_json(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def start_server(run_dir, log_path, flags) -> tuple[subprocess.Popen, int]:
    """`python -m grad_jax.serve --workdir=run_dir --port=0 *flags`, once it reports healthy:
    (the process, its port). Its output goes to `log_path`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - the server writes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "grad_jax.serve", f"--workdir={run_dir}", "--port=0", *flags],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    end = time.monotonic() + START_TIMEOUT_S
    port = None
    while time.monotonic() < end:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
        if found:
            port = int(found.group(1))
            if get_json(port, "/healthz")[0] == 200:  # warmed up
                return proc, port
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start in time:\n" + log_path.read_text())


def _plan(good: dict, bad: dict) -> list[list[list[tuple[str, bytes]]]]:
    """Per client, its requests: each a list of (name, bytes); about 6% hold a bad file."""
    rng = np.random.default_rng(0)
    names, bad_names = sorted(good), sorted(bad)
    plan = []
    for _ in range(CLIENTS):
        requests = []
        for i in range(REQUESTS):
            if rng.random() < 0.06:
                name = bad_names[rng.integers(len(bad_names))]
                requests.append([(name, bad[name])])
            else:
                k = 2 if i % 7 == 3 else 1
                picked = rng.choice(len(names), size=k, replace=False)
                requests.append([(names[j], good[names[j]]) for j in picked])
        plan.append(requests)
    return plan


# --------------------------------------------------------------------------------------------
# Hostile clients: each returns what it got, for the test to check.
# --------------------------------------------------------------------------------------------


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(60)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _raw(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection, stop sending, and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        return read_all(sock)


def _post(port, body, content_type, **headers) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST", "/v1/predict", body=body, headers={"Content-Type": content_type, **headers}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode("latin-1")


def hostile_requests(good_image: bytes) -> dict:
    """`{kind: (send(port) -> answer, check(answer) -> None, is a full POST)}`."""
    ok_body, ok_type = multipart([("part.png", good_image)])
    icon = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(icon, format="ICO")

    def slow_headers(port):
        return _raw(port, b"POST /v1/predict HTT")  # 20 bytes, then nothing

    def slow_body(port):
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ok_type}\r\n"
            f"Content-Length: {len(ok_body)}\r\n\r\n"
        ).encode()
        return _raw(port, head + ok_body[:20])

    def over_length(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.putrequest("POST", "/v1/predict")
            conn.putheader("Content-Type", ok_type)
            conn.putheader("Content-Length", str(10**12))
            conn.endheaders()
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def expect(status, *words):
        def check(answer):
            got, body = answer
            assert got == status, (status, answer)
            for word in words:
                assert word in body["error"], (word, body)

        return check

    def closed(answer):
        assert answer == b"", answer  # closed without a word: it never sent a request

    def timed_out(answer):
        assert _status_line(answer) == "HTTP/1.1 408 Request Timeout", answer[:300]
        assert b"--receive_timeout_s" in answer

    heavy = os.urandom(20 * 1024 * 1024 + 1)
    boundary = ok_type.rpartition("=")[2]
    broken = f"--{boundary}\r\nthis is not a header\r\n\r\nxx\r\n--{boundary}--\r\n".encode()
    return {
        "slow headers": (slow_headers, closed, False),
        "slow body": (slow_body, timed_out, True),
        "over length": (over_length, expect(413, "over the limit"), True),
        "heavy file": (
            lambda port: _post(port, *multipart([("heavy.png", heavy)])),
            expect(413, "heavy.png", "over the limit of 20,971,520"),
            True,
        ),
        "bomb": (
            lambda port: _post(port, *multipart([("bomb.png", bomb_png(40_000, 40_000))])),
            expect(413, "bomb.png"),
            True,
        ),
        "over budget": (
            lambda port: _post(
                port, *multipart([(f"{i}.png", bomb_png(1200, 1200)) for i in range(3)])
            ),
            expect(413, "4,320,000 pixels together", "--max_request_pixels"),
            True,
        ),
        "broken multipart": (
            lambda port: _post(port, broken, ok_type),
            expect(400, "cannot read the form"),
            True,
        ),
        "icon": (
            lambda port: _post(port, *multipart([("part.ico", icon.getvalue())])),
            expect(415, "part.ico", "ICO"),
            True,
        ),
        "foreign host": (
            lambda port: _post(port, ok_body, ok_type, Host="attacker.example"),
            expect(421, "attacker.example"),
            True,
        ),
        "other site": (
            lambda port: _post(port, ok_body, ok_type, Origin="http://attacker.example"),
            expect(403, "attacker.example"),
            True,
        ),
    }


def test_load_on_loopback(tiny_run, tmp_path):
    run_dir, category = tiny_run
    good, bad = _inputs(category)
    predictor = Predictor.from_workdir(run_dir, batch_size=BATCH)
    originals = {n: np.asarray(layout.to_rgb8(layout.open_image(d, n), n)) for n, d in good.items()}
    want = dict(zip(originals, predictor.predict(list(originals.values())), strict=True))
    plan = _plan(good, bad)
    hostile = hostile_requests(good[sorted(good)[0]])

    log_path = tmp_path / "server.log"
    proc, port = start_server(run_dir, log_path, LOAD_FLAGS)
    answers: list[list] = [[] for _ in range(CLIENTS)]
    retries = [0] * CLIENTS
    failures: list[str] = []
    hostile_answers: list[tuple[str, object]] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for files in plan[c]:
                body, content_type = multipart(files)
                start = time.perf_counter()
                while True:
                    conn.request(
                        "POST", "/v1/predict", body=body, headers={"Content-Type": content_type}
                    )
                    response = conn.getresponse()
                    data = response.read()
                    if response.status != 503:
                        break
                    retries[c] += 1
                    time.sleep(float(response.getheader("Retry-After", "1")))
                elapsed = time.perf_counter() - start
                answers[c].append((files, response.status, json.loads(data), elapsed))
        except Exception as err:  # noqa: BLE001 - reported by the test
            failures.append(f"client {c}: {type(err).__name__}: {err}")
        finally:
            conn.close()

    def attacker(kind: str) -> None:
        send = hostile[kind][0]
        try:
            for _ in range(HOSTILE_ROUNDS):
                hostile_answers.append((kind, send(port)))
        except Exception as err:  # noqa: BLE001 - reported by the test
            failures.append(f"hostile {kind}: {type(err).__name__}: {err}")

    try:
        clients = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        attackers = [threading.Thread(target=attacker, args=(kind,)) for kind in hostile]
        wall = time.perf_counter()
        for t in attackers + clients:
            t.start()
        for t in clients:
            t.join()
        wall = time.perf_counter() - wall  # the good clients' time
        for t in attackers:
            t.join()
        status, health = get_json(port, "/healthz")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
    log = log_path.read_text(encoding="utf-8", errors="replace")

    assert not failures, failures
    assert status == 200, health
    assert [len(a) for a in answers] == [REQUESTS] * CLIENTS  # nothing lost
    good_images = bad_requests = 0
    latencies = []
    for files, status, body, elapsed in (x for a in answers for x in a):
        latencies.append(elapsed)
        names = [n for n, _ in files]
        if any(n in bad for n in names):
            bad_requests += 1
            assert 400 <= status < 500, (names, status, body)
            assert names[0] in body["error"], body
            continue
        assert status == 200, (names, status, body)
        assert [x["file"] for x in body["results"]] == names
        for x in body["results"]:
            expected = want[x["file"]]
            assert x["score"] == pytest.approx(expected.score, rel=1e-5, abs=1e-6), x["file"]
            assert x["decision"] == ("anomalous" if expected.is_anomalous else "normal")
            good_images += 1
    assert bad_requests > 0 and good_images > CLIENTS * REQUESTS
    assert health["images"] == good_images  # every good image went through the batcher once
    # every hostile request got what it deserved, every time
    assert sorted(k for k, _ in hostile_answers) == sorted(list(hostile) * HOSTILE_ROUNDS)
    for kind, answer in hostile_answers:
        hostile[kind][1](answer)
    # the server answered every request (retries and hostile ones included), none with a 5xx,
    # and logged no error
    posts = re.findall(r'"POST /v1/predict HTTP/1\.1" (\d{3})', log)
    hostile_posts = HOSTILE_ROUNDS * sum(full for _, _, full in hostile.values())
    assert len(posts) == CLIENTS * REQUESTS + sum(retries) + hostile_posts, log[-3000:]
    assert not [p for p in posts if p.startswith("5") and p != "503"], log[-3000:]
    problems = [line for line in log.splitlines() if re.search(r"ERROR|Traceback|Exception", line)]
    assert not problems, problems
    assert code == 0, log[-3000:]

    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    figures = {
        "requests": CLIENTS * REQUESTS,
        "clients": CLIENTS,
        "good_images": good_images,
        "bad_requests": bad_requests,
        "hostile_requests": len(hostile_answers),
        "errors": 0,
        "retries_after_503": sum(retries),
        "device_calls": health["batches"],
        "images_per_call": round(health["images"] / max(health["batches"], 1), 2),
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "wall_s": round(wall, 2),
        "requests_per_s": round(CLIENTS * REQUESTS / wall, 1),
    }
    (tmp_path / "load.json").write_text(json.dumps(figures, indent=1))
    print("\nserve load test:", json.dumps(figures))
