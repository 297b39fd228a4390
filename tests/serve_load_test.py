"""`python -m grad_jax.serve` as a real server on loopback, under load.

8 clients send 50 requests each, concurrently, over keep-alive connections: images of mixed
sizes, formats and modes, some requests with two images, and a few bad files. Every good image
must come back with Predictor's score, every bad request with a 4xx naming the file, every
request with an answer (503s are retried after Retry-After and counted), and the server's log
must hold no error. The client-side latency (p50, p95) is printed and written to load.json:

    python -m pytest tests/serve_load_test.py -q -s
"""

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from grad_jax import predict
from tests.conftest import ROOT
from tfds_mvtec.mvtec_ad import layout

CLIENTS, REQUESTS = 8, 50
BATCH = 8
START_TIMEOUT_S = 300


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


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _start_server(run_dir, log_path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [f"--workdir={run_dir}", "--port=0", f"--batch_size={BATCH}"]
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - the server writes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "grad_jax.serve", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
        if found:
            return proc, int(found.group(1))
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


def test_load_on_loopback(tiny_run, tmp_path):
    run_dir, category = tiny_run
    good, bad = _inputs(category)
    predictor = predict.Predictor.from_workdir(run_dir, batch_size=BATCH)
    originals = {n: np.asarray(layout.to_rgb8(layout.open_image(d, n), n)) for n, d in good.items()}
    want = dict(zip(originals, predictor.predict(list(originals.values())), strict=True))
    plan = _plan(good, bad)

    log_path = tmp_path / "server.log"
    proc, port = _start_server(run_dir, log_path)
    answers: list[list] = [[] for _ in range(CLIENTS)]
    retries = [0] * CLIENTS
    failures: list[str] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for files in plan[c]:
                body, content_type = _multipart(files)
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

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/healthz")
        health = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
    log = log_path.read_text(encoding="utf-8", errors="replace")

    assert not failures, failures
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
    # the server answered every request (retries included) and logged no error
    posts = len(re.findall(r'"POST /v1/predict HTTP/1\.1" \d{3}', log))
    assert posts == CLIENTS * REQUESTS + sum(retries), log[-3000:]
    problems = [line for line in log.splitlines() if re.search(r"ERROR|Traceback|Exception", line)]
    assert not problems, problems
    assert code == 0, log[-3000:]

    p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
    figures = {
        "requests": CLIENTS * REQUESTS,
        "clients": CLIENTS,
        "good_images": good_images,
        "bad_requests": bad_requests,
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
