"""grad_jax.serving.service through FastAPI's TestClient, grad_jax.serving.batching, and the
serve command line.

The model is a real tiny trained run (the session fixture `tiny_run`); every score the service
returns is compared with `Predictor.predict` on the same image decoded independently.
"""

import base64
import concurrent.futures
import contextlib
import io
import os
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from grad_jax.inference import heatmap
from grad_jax.inference.loader import load_scorer
from grad_jax.inference.predictor import Predictor
from grad_jax.inference.scorer import Scorer, ScoringSpec
from grad_jax.serving import batching, service, uploads
from tests.conftest import bomb_png
from tfds_mvtec.mvtec_ad import layout

SIZE = (64, 64)  # configs/tiny.py
LIMITS = uploads.Limits(max_file_bytes=1_000_000, max_files=4, max_pixels=300_000, overlay_side=256)


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_workdir(tiny_run[0], batch_size=4)


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    app = service.create_app(predictor, LIMITS, max_wait_ms=5)
    with TestClient(app) as c:
        _wait_for(lambda: c.get("/healthz").status_code == 200, "the warm-up")
        yield c


def png(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def demo_rgb(tiny_run, split="test/good", index=0) -> np.ndarray:
    folder = tiny_run[1] / split
    return np.asarray(Image.open(folder / sorted(os.listdir(folder))[index]).convert("RGB"))


def defect_rgb(tiny_run) -> np.ndarray:
    test = tiny_run[1] / "test"
    defect = next(d for d in sorted(os.listdir(test)) if d != "good")
    return demo_rgb(tiny_run, f"test/{defect}")


@pytest.fixture(scope="module")
def good_files(tiny_run):
    """`{name: encoded bytes}` in several formats, modes and sizes."""
    rgb, defect = demo_rgb(tiny_run), defect_rgb(tiny_run)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    big = np.asarray(Image.fromarray(defect).resize((530, 410), Image.BILINEAR))
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    return {
        "good.png": png(rgb),
        "defect.png": png(defect),
        "photo.jpg": png(rgb, "JPEG", quality=90),
        "gray.png": png(gray),
        "deep16.png": png(gray.astype(np.uint16) * 257 + 100),
        "rgba.png": png(np.dstack([rgb, alpha])),
        "big.bmp": png(big, "BMP"),
        "small.tif": png(np.ascontiguousarray(rgb[5:28, 3:34]), "TIFF"),
    }


def expected(predictor, data: bytes, name: str = "x"):
    """Predictor's prediction for encoded bytes, decoded by the predict command's own reader."""
    original = np.asarray(layout.to_rgb8(layout.open_image(data, name), name))
    return original, predictor.predict([original])[0]


def post(client, files, **fields):
    parts = [("file", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/v1/predict", files=parts, data={k: str(v) for k, v in fields.items()})


# --------------------------------------------------------------------------------------------
# Scores, maps, overlays, decisions.
# --------------------------------------------------------------------------------------------


def test_scores_and_maps_equal_predictor(client, predictor, good_files):
    names = list(good_files)
    threshold = predictor.threshold
    for start in range(0, len(names), LIMITS.max_files):
        chunk = names[start : start + LIMITS.max_files]
        r = post(client, [(n, good_files[n]) for n in chunk], raw_map=1)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["file"] for x in results] == chunk  # upload order, names kept
        for name, x in zip(chunk, results, strict=True):
            original, want = expected(predictor, good_files[name], name)
            assert x["score"] == pytest.approx(want.score, rel=1e-5, abs=1e-7), name
            got_map = uploads.decode_map(x["raw_map"])
            assert got_map.shape == SIZE and got_map.dtype == np.float32
            np.testing.assert_allclose(got_map, want.anomaly_map, rtol=1e-5, atol=1e-7)
            assert (x["width"], x["height"]) == (original.shape[1], original.shape[0])
            assert x["category"] == "hex_nut"
            assert x["threshold"] == pytest.approx(threshold)
            assert "hex_nut" in x["threshold_source"]
            assert x["decision"] == ("anomalous" if want.score >= threshold else "normal")
            assert want.calibrated is not None  # the run stores its held-out normal scores
            assert x["calibrated"] == pytest.approx(want.calibrated)
            assert x["false_alarm_bound"] == pytest.approx(want.false_alarm_bound)
            assert 1 <= x["batch"] <= predictor.batch_size
            assert x["time_ms"] >= x["timing_ms"]["predict"] > 0
            assert "overlay_png" not in x


def test_overlay_png(client, predictor, good_files):
    r = post(
        client,
        [("defect.png", good_files["defect.png"]), ("big.bmp", good_files["big.bmp"])],
        overlay=1,
    )
    assert r.status_code == 200, r.text
    small, big = r.json()["results"]
    for x, name in ((small, "defect.png"), (big, "big.bmp")):
        original, want = expected(predictor, good_files[name], name)
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(x["overlay_png"]))))
        h, w = original.shape[:2]
        scale = min(1.0, LIMITS.overlay_side / max(h, w))
        assert image.shape == (round(h * scale), round(w * scale), 3), name
        assert x["overlay_range"] == [0.0, pytest.approx(2 * predictor.threshold)]
        # the colours of the predict command's overlays (same map, same range)
        shown = np.asarray(Image.fromarray(original).resize(image.shape[1::-1], Image.BILINEAR))
        heat = np.asarray(
            Image.fromarray(want.anomaly_map).resize(image.shape[1::-1], Image.BILINEAR)
        )
        reference = heatmap.overlay(shown, heat, 0.0, 2 * predictor.threshold)
        assert np.abs(image.astype(int) - reference).max() <= 1, name
    assert max(big["width"], big["height"]) > LIMITS.overlay_side  # it was shrunk


def test_threshold_and_category_fields(client, predictor, good_files):
    data = [("defect.png", good_files["defect.png"])]
    score = post(client, data).json()["results"][0]["score"]
    for threshold, decision in ((score, "anomalous"), (score * 1.001, "normal")):
        x = post(client, data, threshold=threshold).json()["results"][0]
        assert (x["threshold"], x["decision"]) == (threshold, decision)
        assert x["threshold_source"] == "given by the caller"
    x = post(client, data, category="hex_nut").json()["results"][0]
    assert x["threshold"] == pytest.approx(predictor.category_thresholds["hex_nut"])
    r = post(client, data, category="bottle")
    assert r.status_code == 400 and r.json()["error"] == "unknown category 'bottle'; known: hex_nut"
    for bad in ("abc", "nan", "inf"):
        r = post(client, data, threshold=bad)
        assert r.status_code == 400 and "finite number" in r.json()["error"], bad


# --------------------------------------------------------------------------------------------
# Bad uploads: a 4xx naming the problem, and the service keeps serving.
# --------------------------------------------------------------------------------------------


def _bad_files(good_files):
    data = good_files["big.bmp"]
    return {
        "empty.png": (b"", 400, "empty.png: the file is empty"),
        "notes.png": (b"just text, not pixels\n", 415, "notes.png: not a recognised image"),
        "cut.bmp": (data[: len(data) // 2],  422, "cut.bmp: cannot decode the pixels"),
        "float.tif": (png(np.ones((8, 8), np.float32), "TIFF"), 422, "float.tif: floating-point"),
        "heavy.png": (os.urandom(LIMITS.max_file_bytes + 1), 413, "over the limit of 1,000,000"),
        "wide.png": (bomb_png(700, 500), 413, "700 x 500 = 350,000 pixels, over the limit of 300"),
        "bomb.png": (bomb_png(40_000, 40_000), 413, "bomb.png: refused as a decompression bomb"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["empty.png", "notes.png", "cut.bmp", "float.tif", "heavy.png", "wide.png", "bomb.png"]
)
def test_bad_upload_is_refused_and_service_keeps_serving(client, good_files, name):
    data, status, message = _bad_files(good_files)[name]
    r = post(client, [(name, data)])
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    # with a good file in the same request: refused whole, the bad one named
    r = post(client, [("good.png", good_files["good.png"]), (name, data)])
    assert r.status_code == status
    assert r.json()["error"].startswith("1 of 2 files cannot be scored: ") and name in r.text
    r = post(client, [("good.png", good_files["good.png"])])
    assert r.status_code == 200 and r.json()["results"][0]["file"] == "good.png"


def test_bad_requests(client, good_files):
    good = ("good.png", good_files["good.png"])
    r = client.post("/v1/predict", content=good[1], headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = client.post("/v1/predict", data={"overlay": "1"}, files={"x": ("", b"")})
    assert r.status_code == 400
    r = client.post("/v1/predict", data={"overlay": "1"})
    assert r.status_code == 415  # a form without files is urlencoded
    r = post(client, [good] * (LIMITS.max_files + 1))
    assert r.status_code == 400 and "Too many files" in r.json()["error"]
    r = client.post(
        "/v1/predict",
        content=b"x" * 10,
        headers={
            "content-type": "multipart/form-data; boundary=b",
            "content-length": str(LIMITS.max_request_bytes + 1),
        },
    )
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert post(client, [good]).status_code == 200


def test_body_over_the_limit_without_content_length(client):
    """A streamed (chunked) body is cut off once it passes the limit."""

    def body():
        yield b"--b\r\ncontent-disposition: form-data; name=file; filename=a.png\r\n\r\n"
        for _ in range(LIMITS.max_request_bytes // 65536 + 2):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    r = client.post(
        "/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_the_request_limit_counts_the_whole_body(client, streamed):
    """Four files each under the per-file limit pass; the same files followed by 2 MB of bytes
    after the form's end pass the request's limit (not any file's): 413 for the request, with or
    without Content-Length (then streamed in 64 KiB chunks and cut off while it arrives)."""
    rng = np.random.default_rng(0)
    files = [png(rng.integers(0, 256, (500, 590, 3), dtype=np.uint8)) for _ in range(4)]
    assert all(600_000 < len(f) < LIMITS.max_file_bytes for f in files)
    assert sum(map(len, files)) < LIMITS.max_request_bytes
    head = b"".join(
        b"--b\r\ncontent-disposition: form-data; name=file; filename=f%d.png\r\n"
        b"content-type: image/png\r\n\r\n" % i + f + b"\r\n"
        for i, f in enumerate(files)
    )
    form = head + b"--b--\r\n"
    epilogue = b"\0" * (2 * 1024 * 1024)
    assert len(form) < LIMITS.max_request_bytes < len(form + epilogue)

    def send(body: bytes):
        content = body
        if streamed:
            content = (body[i : i + 65536] for i in range(0, len(body), 65536))
        headers = {"content-type": "multipart/form-data; boundary=b"}
        return client.post("/v1/predict", content=content, headers=headers)

    r = send(form)
    assert r.status_code == 200, r.text
    assert [x["file"] for x in r.json()["results"]] == [f"f{i}.png" for i in range(4)]
    r = send(form + epilogue)
    assert r.status_code == 413, r.text
    assert f"the request is over the limit of {LIMITS.max_request_bytes:,} bytes" in r.text
    assert send(form).status_code == 200  # and the service goes on


# --------------------------------------------------------------------------------------------
# The other routes.
# --------------------------------------------------------------------------------------------


def test_model_and_health(client, predictor):
    info = client.get("/v1/model").json()
    assert info["image_size"] == list(SIZE)
    assert info["categories"] == ["hex_nut"]
    assert info["batch_size"] == 4 and info["max_queue"] == 16
    assert info["limits"]["max_pixels"] == LIMITS.max_pixels
    assert info["meta"]["threshold"]["image_score"] == pytest.approx(predictor.threshold)
    assert info["meta"]["step"] == predictor.step
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert 'id="threshold"' in page and 'id="files"' in page and 'id="download"' in page
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "//cdn" not in lowered
    assert "<link" not in lowered and "<script src" not in lowered and "@import" not in lowered
    # nothing else the server offers needs the internet either
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------------------------
# Batching and back-pressure, made deterministic with a model that waits for a gate.
# --------------------------------------------------------------------------------------------


class GatedModel(Scorer):
    """The predictor's scorer whose device calls wait for `gate`; records every call's size."""

    def __init__(self, inner):
        super().__init__(inner.program, inner.spec, inner.meta, inner.batch_size)
        self.gate = threading.Event()
        self.calls: list[int] = []
        self.entered = threading.Semaphore(0)

    def score_prepared(self, batch):
        self.calls.append(len(batch))
        self.entered.release()
        assert self.gate.wait(60)
        return super().score_prepared(batch)


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_concurrent_requests_share_device_calls(predictor, good_files):
    from fastapi.testclient import TestClient

    model = GatedModel(predictor)
    app = service.create_app(model, LIMITS, max_wait_ms=5, warm_up=False)
    names = ["good.png", "defect.png", "gray.png", "photo.jpg", "rgba.png", "big.bmp", "small.tif"]
    with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, c, [("good.png", good_files["good.png"])])
        assert model.entered.acquire(timeout=60)  # the worker is busy with the first request
        rest = [pool.submit(post, c, [(n, good_files[n])]) for n in names[1:]]
        _wait_for(lambda: app.state.batcher.waiting == len(rest), "the requests to queue")
        model.gate.set()
        answers = [first.result(60), *(f.result(60) for f in rest)]
    assert model.calls == [1, 4, 2]  # batch_size 4: the six waiting images in two calls
    for name, r in zip(names, answers, strict=True):
        assert r.status_code == 200, r.text
        x = r.json()["results"][0]
        assert x["score"] == pytest.approx(expected(predictor, good_files[name])[1].score, rel=1e-5)
    assert sorted(r.json()["results"][0]["batch"] for r in answers) == [1, 2, 2, 4, 4, 4, 4]


def test_full_queue_answers_503_with_retry_after(predictor, good_files):
    from fastapi.testclient import TestClient

    model = GatedModel(predictor)
    app = service.create_app(model, LIMITS, max_wait_ms=5, max_queue=4, warm_up=False)
    blank = np.zeros((*SIZE, 3), np.uint8)
    with TestClient(app) as c:
        batcher = app.state.batcher
        busy = batcher.submit([blank])
        assert model.entered.acquire(timeout=60)
        queued = batcher.submit([blank] * 3)
        r = post(c, [("a.png", good_files["good.png"]), ("b.png", good_files["gray.png"])])
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and "queue of 4 images is full" in r.json()["error"]
        model.gate.set()
        for f in busy + queued:
            f.result(60)
        r = post(c, [("a.png", good_files["good.png"])])  # room again
        assert r.status_code == 200
    assert model.calls == [1, 3, 1]


class MeanProgram:
    """A device program whose score is the image's mean brightness (0..1) and whose pooled
    feature is the same number, for a scorer with per-class thresholds and class centres."""

    def rows(self, n):
        return n

    def __call__(self, images):
        mean = images.reshape(len(images), -1).mean(axis=1) / 255.0
        maps = np.broadcast_to(mean[:, None, None], (len(images), *SIZE)).astype(np.float32)
        return {"raw": maps, "smoothed": maps, "score": mean, "pooled": mean[:, None]}


class RecordingScorer(Scorer):
    """Records the classes each decision was asked for."""

    def __init__(self):
        meta = {
            "categories": ["bolt", "nut"],
            "threshold": {
                "image_score": 0.5,
                "quantile": 0.99,
                "per_category": {"bolt": 0.9, "nut": 0.1},
                "normal_scores": {"bolt": [0.0] * 4, "nut": [0.0, 0.0, 0.0, 1.0]},
            },
            "class_centres": {"names": ["bolt", "nut"], "centres": [[1000.0], [0.0]]},
        }
        super().__init__(MeanProgram(), ScoringSpec(SIZE, 5, 8), meta, batch_size=4)
        self.seen: list = []

    def decide(self, scored, categories=None, threshold=None):
        self.seen.append(categories)
        return super().decide(scored, categories, threshold)


def test_per_class_decisions_and_recognition_pass_through(good_files):
    from fastapi.testclient import TestClient

    model = RecordingScorer()
    with TestClient(service.create_app(model, LIMITS, warm_up=False)) as c:
        auto = post(c, [("good.png", good_files["good.png"])]).json()["results"][0]
        chosen = post(c, [("good.png", good_files["good.png"])], category="bolt").json()
        assert c.get("/v1/model").json()["meta"]["categories"] == ["bolt", "nut"]
    assert (auto["category"], auto["threshold"]) == ("nut", 0.1)
    assert auto["threshold_source"].startswith("class 'nut'")
    assert "recognised" in auto["threshold_source"]
    # 3 of the nut's 4 held-out normal scores are lower: 3 / (4 + 1), conformal
    assert auto["calibrated"] == pytest.approx(3 / 5) and auto["decision"] == "anomalous"
    x = chosen["results"][0]
    assert (x["category"], x["threshold"], x["decision"]) == ("bolt", 0.9, "normal")
    assert model.seen == [None, "bolt"]  # no class given: None, for the scorer to recognise


# --------------------------------------------------------------------------------------------
# The batcher alone.
# --------------------------------------------------------------------------------------------


def held_batcher(max_wait_s: float):
    """A batcher of 3 (queue 8) whose worker records each batch in `calls`, releases `entered`
    and waits for `gate` before answering 10 x each item (a batch holding "boom" raises)."""
    calls, gate, entered = [], threading.Event(), threading.Semaphore(0)

    def run(items):
        calls.append(list(items))
        entered.release()
        assert gate.wait(60)
        if "boom" in items:
            raise RuntimeError("boom")
        return [x * 10 for x in items]

    return (
        batching.Batcher(run, batch_size=3, max_wait_s=max_wait_s, max_queue=8),
        calls,
        gate,
        entered,
    )


def test_batcher_collects_and_survives_a_failing_batch():
    b, calls, gate, entered = held_batcher(max_wait_s=0.002)
    try:
        first = b.submit([1])
        assert entered.acquire(timeout=30)  # the worker is busy
        singles = [b.submit([x])[0] for x in (2, 3, 4, 5)]
        with pytest.raises(batching.QueueFull):
            b.submit([0] * 5)  # 4 waiting + 5 > 8: refused whole
        assert b.waiting == 4
        gate.set()
        result, info = first[0].result(30)
        assert result == 10 and info.size == 1 and info.wait_s >= 0 and info.run_s >= 0
        assert [f.result(30)[0] for f in singles] == [20, 30, 40, 50]
        assert [f.result(30)[1].size for f in singles] == [3, 3, 3, 1]
        assert calls == [[1], [2, 3, 4], [5]]
        bad = b.submit(["boom"])
        with pytest.raises(RuntimeError, match="boom"):
            bad[0].result(30)
        assert b.submit([6])[0].result(30)[0] == 60  # the worker lives on
    finally:
        gate.set()
        b.close()
    assert not b.alive
    with pytest.raises(batching.BatcherClosed):
        b.submit([1])


def test_batcher_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        batching.Batcher(lambda x: x, batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        batching.Batcher(lambda x: x, batch_size=4, max_queue=2)


# --------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------


def test_serve_command_usage_errors(tiny_run, tmp_path, capsys):
    from grad_jax import serve

    assert serve.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m grad_jax.serve --model=MODEL_DIR" in out and "--max_pixels" in out
    assert serve.main(["serve"]) == 2
    assert "exactly one of --model=MODEL_DIR and --workdir=RUN_DIR" in capsys.readouterr().err
    assert serve.main(["serve", f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grad_jax: error: ") and "not a grad_jax run folder" in err
    assert err.count("\n") == 1
    assert serve.main(["serve", f"--model={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(tmp_path) in err
    assert serve.main(["serve", f"--workdir={tiny_run[0]}", "--max_pixels=0"]) == 2
    assert "max_pixels must be at least 1" in capsys.readouterr().err
    for flag, message in (
        ("--max_decodes=0", "--max_decodes must be positive, got 0"),
        ("--receive_timeout_s=0", "--receive_timeout_s must be positive"),
        ("--allow_formats=PNG,NOPE", "--allow_formats: unknown image format 'NOPE'"),
    ):
        assert serve.main(["serve", f"--workdir={tiny_run[0]}", flag]) == 2, flag
        assert message in capsys.readouterr().err, flag


def test_serve_command_limits_and_their_defaults(capsys):
    from grad_jax import serve

    assert serve.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    defaults = {
        "max_pixels": "40000000",  # a camera's worth, not Pillow's 89 MP
        "max_request_pixels": "160000000",
        "max_decodes": "2",
        "receive_timeout_s": "60.0",
        "deadline_s": "60.0",
        "max_connections": "32",
        "shutdown_timeout_s": "10.0",
        "allowed_hosts": "",
        "allow_formats": "",
    }
    for flag, default in defaults.items():
        found = re.search(rf"--{flag}:.*?\(default: '([^']*)'\)", out, flags=re.S)
        assert found and found.group(1) == default, flag
    assert service.create_app(fake_scorer()).state.service.limits.max_pixels == 40_000_000


def test_an_exported_model_serves_the_predictor_s_results(tiny_run, predictor, exported):
    """`--model=DIR`: the service over `grad_jax.inference.exported_model` answers with
    Predictor's scores, classes, thresholds and decisions."""
    from fastapi.testclient import TestClient

    model = load_scorer(model_dir=str(exported), batch_size=4)
    images = [demo_rgb(tiny_run), defect_rgb(tiny_run)]
    expected = predictor.predict(images)
    files = [("good.png", png(images[0])), ("defect.png", png(images[1]))]
    with TestClient(service.create_app(model, LIMITS, warm_up=False)) as c:
        results = post(c, files).json()["results"]
    for got, want in zip(results, expected, strict=True):
        assert got["score"] == pytest.approx(want.score, rel=1e-5, abs=1e-6)
        assert got["category"] == want.category
        assert got["threshold"] == pytest.approx(want.threshold)
        assert got["decision"] == ("anomalous" if want.is_anomalous else "normal")


# --------------------------------------------------------------------------------------------
# Fakes for the hardening tests: a program whose score is the image's mean brightness.
# --------------------------------------------------------------------------------------------


class FakeProgram:
    """Score and pooled feature = the image's mean brightness (0..1); NaN for an all-white image.
    Rows like the exported program (1, 2, 4, ..., batch); records every call's rows, and waits
    for `gate` when one is set."""

    def __init__(self, batch_size: int, gate: threading.Event | None = None):
        self.buckets = sorted({min(2**k, batch_size) for k in range(batch_size.bit_length() + 1)})
        self.calls: list[int] = []
        self.gate = gate

    def rows(self, n):
        return next(b for b in self.buckets if b >= n)

    def __call__(self, images):
        self.calls.append(len(images))
        if self.gate is not None:
            assert self.gate.wait(60)
        mean = images.reshape(len(images), -1).mean(axis=1) / 255.0
        score = np.where(mean > 0.999, np.nan, mean)
        maps = np.broadcast_to(mean[:, None, None], (len(images), *SIZE)).astype(np.float32)
        return {"raw": maps, "smoothed": maps, "score": score, "pooled": mean[:, None]}


#: Two classes: 'nut' around brightness 0.1 and 'bolt' around 0.9, each within 0.05 of its
#: centre (the class centres' rejection radii): a mid-grey image is neither.
TWO_CLASSES = {
    "categories": ["bolt", "nut"],
    "threshold": {
        "image_score": 0.5,
        "quantile": 0.99,
        "per_category": {"bolt": 0.95, "nut": 0.05},
        "normal_scores": {"bolt": [0.9] * 4, "nut": [0.1] * 4},
    },
    "class_centres": {"names": ["bolt", "nut"], "centres": [[0.9], [0.1]], "radii": [0.05, 0.05]},
    "config": {"data": {"root": "parts/line3", "data_dir": "/home/op/tfds"}},
    "workdir": "/home/op/runs/line3",
}


def fake_scorer(batch_size=4, gate=None, meta=None) -> Scorer:
    return Scorer(FakeProgram(batch_size, gate), ScoringSpec(SIZE, 5, 8), meta or {}, batch_size)


def grey(value: int, size=(40, 30)) -> bytes:
    return png(np.full((*size, 3), value, np.uint8))


class Clock:
    """A fake monotonic clock: it moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _app(model, **overrides):
    from fastapi.testclient import TestClient

    overrides.setdefault("warm_up", False)
    limits = overrides.pop("limits", LIMITS)
    return TestClient(service.create_app(model, limits, **overrides))


# --------------------------------------------------------------------------------------------
# A non-finite score and an unknown class (issue 18, items 2 and 4).
# --------------------------------------------------------------------------------------------


def test_a_non_finite_score_is_a_json_error_naming_the_file():
    with _app(fake_scorer()) as c:
        r = post(c, [("white.png", grey(255))])
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error.startswith("white.png: ") and "non-finite score" in error, error
        r = post(c, [("dark.png", grey(26)), ("white.png", grey(255))])
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error.startswith("1 of 2 files cannot be scored: white.png: "), error
        assert "dark.png" not in error
        assert post(c, [("dark.png", grey(26))]).status_code == 200


def test_an_unknown_class_has_no_class_and_no_decision():
    """The class centres' rejection radii (meta 'class_centres' 'radii'): a mid-grey image is
    neither class and is not decided, not even with a threshold given; a dark one is a nut."""
    with _app(fake_scorer(meta=TWO_CLASSES)) as c:
        for fields in ({}, {"threshold": 0.01}):
            r = post(c, [("dark.png", grey(26)), ("mid.png", grey(128))], overlay=1, **fields)
            assert r.status_code == 200, r.text
            dark, mid = r.json()["results"]
            assert (dark["category"], dark["category_source"]) == ("nut", "recognised")
            assert dark["decision"] == "anomalous"  # 0.102 >= 0.05 (or >= 0.01)
            assert mid["category"] is None and mid["category_source"] == "unknown class"
            assert mid["decision"] is None and mid["threshold"] is None
            assert "unknown class" in mid["threshold_source"]
            assert mid["score"] == pytest.approx(128 / 255)
            assert "overlay_png" in mid
        # a class given by the caller is decided
        x = post(c, [("mid.png", grey(128))], category="bolt").json()["results"][0]
        assert (x["category"], x["decision"]) == ("bolt", "normal")


# --------------------------------------------------------------------------------------------
# Memory: pixel budgets, queue room before decoding, decodes at once (item 6).
# --------------------------------------------------------------------------------------------


@pytest.fixture
def counted_decodes(monkeypatch):
    """The names `uploads.decode` was called with, as the service calls it."""
    calls = []
    real = uploads.decode

    def decode(data, name, *args, **kw):
        calls.append(name)
        return real(data, name, *args, **kw)

    monkeypatch.setattr(uploads, "decode", decode)
    return calls


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(counted_decodes):
    with _app(fake_scorer(), max_request_pixels=500_000) as c:
        r = post(c, [("a.png", bomb_png(600, 450)), ("b.png", bomb_png(600, 450))])
        assert r.status_code == 413, r.text
        assert "540,000 pixels together, over the limit of 500,000" in r.json()["error"]
        assert "--max_request_pixels" in r.json()["error"]
        assert counted_decodes == []
        r = post(c, [("a.png", grey(26, (600, 450))), ("b.png", grey(26, (300, 450)))])
        assert r.status_code == 200, r.text  # 405,000 pixels


def test_queue_room_is_reserved_before_decoding(counted_decodes):
    gate = threading.Event()
    model = fake_scorer(gate=gate)
    blank = np.zeros((*SIZE, 3), np.uint8)
    with _app(model, max_queue=4) as c:
        batcher = c.app.state.batcher
        busy = batcher.submit([blank])
        _wait_for(lambda: model.program.calls, "the worker to be busy")
        queued = batcher.submit([blank] * 3)
        r = post(c, [("a.png", grey(26)), ("b.png", grey(26))])
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert counted_decodes == []  # refused before decoding anything
        assert batcher.reserved == 0 and batcher.waiting == 3
        gate.set()
        for f in busy + queued:
            f.result(60)
        # a request refused while decoding gives its room back
        r = post(c, [("a.png", grey(26)), ("cut.png", grey(26)[:40])])
        assert r.status_code in (415, 422) and "cut.png" in r.json()["error"], r.text
        assert batcher.reserved == 0 and batcher.waiting == 0
        assert post(c, [("a.png", grey(26))] * 4).status_code == 200


def test_decodes_at_once_are_bounded(monkeypatch):
    entered, active, most, release = [], [0], [0], threading.Semaphore(0)
    lock = threading.Lock()
    real = uploads.decode

    def decode(data, name, *args, **kw):
        with lock:
            entered.append(name)
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            assert release.acquire(timeout=60)
            return real(data, name, *args, **kw)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(uploads, "decode", decode)
    with _app(fake_scorer(), max_decodes=2) as c, concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, c, [(f"{i}.png", grey(26))]) for i in range(6)]

        def health():
            return c.get("/healthz").json()

        _wait_for(lambda: health()["waiting_to_decode"] == 4, "four images to wait for a slot")
        assert health()["decoding"] == 2 and active[0] == 2 and len(entered) == 2
        for _ in range(6):
            release.release()
        assert all(f.result(60).status_code == 200 for f in futures)
    assert most[0] == 2 and len(entered) == 6


# --------------------------------------------------------------------------------------------
# A hung, failing or dead worker (item 8).
# --------------------------------------------------------------------------------------------


def test_batcher_deadlines_with_a_fake_clock():
    clock, gate, entered = Clock(), threading.Event(), threading.Semaphore(0)

    def run(items):
        entered.release()
        assert gate.wait(60)
        return [x * 10 for x in items]

    b = batching.Batcher(run, batch_size=2, max_wait_s=0, max_queue=4, clock=clock, stall_s=30)
    try:
        running = b.submit([1], deadline=clock() + 10)
        assert entered.acquire(timeout=60)
        queued = b.submit([2], deadline=clock() + 5)
        patient = b.submit([3], deadline=clock() + 100)
        clock.now += 4
        assert b.expire() == 0 and b.health() == (True, "ok")
        clock.now += 2  # 6 s: the queued item's deadline (5 s) has passed
        assert b.expire() == 1
        with pytest.raises(batching.DeadlineExceeded, match="deadline of 5 s: waited 6 s in"):
            queued[0].result(0)
        clock.now += 5  # 11 s: the item in the hung call (10 s)
        assert b.expire() == 1
        with pytest.raises(batching.DeadlineExceeded) as caught:
            running[0].result(0)
        assert "in a device call that has not returned" in str(caught.value)
        assert "deadline of 10 s" in str(caught.value) and not patient[0].done()
        clock.now += 20  # the call has run 31 s, over stall_s: unhealthy, no new work
        ok, why = b.health()
        assert not ok and "one device call for 31 s, over the limit of 30 s" in why
        with pytest.raises(batching.Stalled):
            b.submit([4])
        gate.set()  # the call returns: its expired item stays failed, the rest is served
        assert patient[0].result(60)[0] == 30
        assert b.health() == (True, "ok") and b.submit([5])[0].result(60)[0] == 50
        assert b.expired == 2
    finally:
        gate.set()
        b.close()


def test_batcher_reservations_hold_room():
    gate = threading.Event()
    b = batching.Batcher(lambda items: [gate.wait(60) and x for x in items], 2, 0, max_queue=4)
    try:
        held = b.reserve(3)
        assert b.reserved == 3
        with pytest.raises(batching.QueueFull):
            b.submit([1, 2])
        futures = held.submit(["a", "b"])  # two of the three
        held.release()
        assert b.reserved == 0
        gate.set()
        assert [f.result(60)[0] for f in futures] == ["a", "b"]
        with b.reserve(4) as all_of_it:
            assert b.reserved == 4
        assert b.reserved == 0
        with pytest.raises(ValueError, match="released"):
            all_of_it.submit([1])
    finally:
        gate.set()
        b.close()


def test_a_failing_batch_fails_only_the_item_that_caused_it():
    b, calls, gate, entered = held_batcher(max_wait_s=0)
    try:
        first = b.submit([1])
        assert entered.acquire(timeout=60)
        rest = [b.submit([x])[0] for x in (2, "boom", 3)]
        gate.set()
        assert first[0].result(60)[0] == 10
        (two, info2), (three, _) = rest[0].result(60), rest[2].result(60)
        assert (two, three) == (20, 30) and info2.retried and info2.size == 1
        with pytest.raises(RuntimeError, match="boom"):
            rest[1].result(60)
        assert calls == [[1], [2, "boom", 3], [2], ["boom"], [3]]
    finally:
        gate.set()
        b.close()


def test_a_dead_worker_fails_waiting_work_and_refuses_new():
    gate, entered = threading.Event(), threading.Semaphore(0)

    def run(items):
        entered.release()
        assert gate.wait(60)
        raise SystemExit("the device is gone")

    b = batching.Batcher(run, batch_size=1, max_wait_s=0, max_queue=4)
    first = b.submit([1])
    assert entered.acquire(timeout=60)
    waiting = b.submit([2])
    gate.set()
    for future in (first[0], waiting[0]):
        with pytest.raises(batching.WorkerStopped, match="the device is gone"):
            future.result(60)
    _wait_for(lambda: not b.alive, "the worker to stop")
    ok, why = b.health()
    assert not ok and "the batching worker stopped (SystemExit: the device is gone)" in why
    with pytest.raises(batching.WorkerStopped):
        b.submit([3])
    b.close()


class GatedScorer(Scorer):
    """The fake scorer whose device calls wait for `gate`, fail on a black image, or kill the
    worker when `die` is set; records every call's size."""

    def __init__(self, **kw):
        super().__init__(FakeProgram(4), ScoringSpec(SIZE, 5, 8), {}, 4)
        self.gate, self.die = threading.Event(), False
        self.entered = threading.Semaphore(0)
        self.calls: list[int] = []

    def score_prepared(self, batch):
        self.calls.append(len(batch))
        self.entered.release()
        assert self.gate.wait(60)
        if self.die:
            raise SystemExit("the device is gone")
        if any(int(image.max()) == 0 for image in batch):
            raise ValueError("the model cannot take a black image")
        return super().score_prepared(batch)


def test_a_hung_device_call_answers_504_and_makes_the_service_unhealthy():
    clock, model = Clock(), GatedScorer()
    with (
        _app(model, clock=clock, deadline_s=10) as c,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        hung = pool.submit(post, c, [("a.png", grey(26))])
        assert model.entered.acquire(timeout=60)
        queued = pool.submit(post, c, [("b.png", grey(26))])
        _wait_for(lambda: c.app.state.batcher.waiting == 1, "the second request to queue")
        clock.now += 11
        for r, where in ((hung.result(60), "device call"), (queued.result(60), "in the queue")):
            assert r.status_code == 504, r.text
            assert "within the deadline of 10 s (--deadline_s)" in r.json()["error"]
            assert where in r.json()["error"]
        health = c.get("/healthz")
        assert health.status_code == 503 and "one device call for 11 s" in health.json()["status"]
        r = post(c, [("c.png", grey(26))])
        assert r.status_code == 503 and "stalled" in r.json()["error"]
        model.gate.set()
        _wait_for(lambda: c.get("/healthz").status_code == 200, "the call to return")
        assert post(c, [("c.png", grey(26))]).status_code == 200


def test_a_failing_batch_fails_only_the_request_whose_image_caused_it():
    model = GatedScorer()
    with _app(model, max_wait_ms=0) as c, concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, c, [("first.png", grey(26))])
        assert model.entered.acquire(timeout=60)
        good = pool.submit(post, c, [("good.png", grey(26))])
        bad = pool.submit(post, c, [("black.png", grey(0))])
        _wait_for(lambda: c.app.state.batcher.waiting == 2, "both requests to queue")
        model.gate.set()
        assert first.result(60).status_code == 200 and good.result(60).status_code == 200
        r = bad.result(60)
    assert r.status_code == 500, r.text
    assert r.json()["error"].startswith("black.png: the model failed on this image (ValueError")
    assert model.calls == [1, 2, 1, 1]  # the batch of two, then each image alone


def test_a_dead_worker_makes_the_service_unhealthy_and_refuse_work():
    model = GatedScorer()
    model.die = True
    model.gate.set()
    with _app(model) as c:
        r = post(c, [("a.png", grey(26))])
        assert r.status_code == 503 and "the device is gone" in r.json()["error"], r.text
        _wait_for(lambda: not c.app.state.batcher.alive, "the worker to stop")
        health = c.get("/healthz")
        assert health.status_code == 503
        assert "the batching worker stopped (SystemExit" in health.json()["status"]
        r = post(c, [("b.png", grey(26))])
        assert r.status_code == 503 and "restart the service" in r.json()["error"]
    assert model.calls == [1]


# --------------------------------------------------------------------------------------------
# Warm-up (item 9).
# --------------------------------------------------------------------------------------------


def test_warm_up_runs_every_batch_size_before_the_service_is_healthy():
    gate = threading.Event()
    model = fake_scorer(batch_size=8, gate=gate)
    with _app(model, warm_up=True) as c:
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "warming up"
        r = post(c, [("a.png", grey(26))])
        assert r.status_code == 503 and "warming up" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
        gate.set()
        _wait_for(lambda: c.get("/healthz").status_code == 200, "the warm-up")
        warmed = list(model.program.calls)
        assert post(c, [("a.png", grey(26))] * 3).status_code == 200
    # every row count a batch of 1..8 images is padded to: 1, 2, 4, 8
    assert set(warmed) == {1, 2, 4, 8}
    assert model.program.calls[len(warmed) :] == [4]  # three images ran on a warmed program


# --------------------------------------------------------------------------------------------
# The API's trust boundaries (items 10 and 12).
# --------------------------------------------------------------------------------------------


def test_only_accepted_formats_are_decoded():
    icon = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 26, np.uint8)).save(icon, format="ICO")
    with _app(fake_scorer()) as c:
        r = post(c, [("part.ico", icon.getvalue())])
        assert r.status_code == 415, r.text
        assert "part.ico: " in r.json()["error"] and "ICO" in r.json()["error"]
        assert "--allow_formats=ICO" in r.json()["error"]
        assert c.get("/v1/model").json()["limits"]["formats"] == ["PNG", "JPEG", "BMP", "TIFF"]
    with _app(fake_scorer(), allow_formats=("ico",)) as c:
        r = post(c, [("part.ico", icon.getvalue())])
        assert r.status_code == 200, r.text


def test_every_response_is_marked_and_the_page_script_pinned_by_hash():
    import hashlib

    with _app(fake_scorer()) as client:
        page = client.get("/")
        csp = page.headers["content-security-policy"]
        (script,) = re.findall(r"<script>(.*?)</script>", page.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == f"'sha256-{digest}'"
        assert "unsafe-inline" not in csp and directives["frame-ancestors"] == "'none'"
        answers = [
            page,
            client.get("/healthz"),
            client.get("/v1/model"),
            client.get("/no/such/page"),
            post(client, [("notes.png", b"text")]),
            client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),
            client.get("/", headers={"host": "attacker.example"}),
        ]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], r.request.url


def test_host_and_origin_are_checked():
    good = [("good.png", grey(26))]
    with _app(fake_scorer(), allowed_hosts=("linepc.local",)) as c:
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.nip.io"):
            r = c.get("/v1/model", headers={"host": host})
            assert r.status_code == 421, host
            assert "does not answer to the host" in r.json()["error"]
            assert "--allowed_hosts" in r.json()["error"]
        for host in (
            "localhost:8000",
            "127.0.0.1:8000",
            "[::1]:8000",
            "LinePC.local",
            "testserver",
        ):
            assert c.get("/v1/model", headers={"host": host}).status_code == 200, host
        headers = {"host": "127.0.0.1:8000"}
        for origin in ("http://attacker.example", "http://127.0.0.1:9999", "null"):
            parts = [("file", (n, d, "image/png")) for n, d in good]
            r = c.post("/v1/predict", files=parts, headers={**headers, "origin": origin})
            assert r.status_code == 403, origin
            assert "refused: only this service's own page" in r.json()["error"]
        parts = [("file", (n, d, "image/png")) for n, d in good]
        r = c.post(
            "/v1/predict", files=parts, headers={**headers, "origin": "http://127.0.0.1:8000"}
        )
        assert r.status_code == 200, r.text
        assert post(c, good).status_code == 200  # no Origin: not a browser
    with _app(fake_scorer(), allowed_hosts=("*",)) as c:
        assert c.get("/v1/model", headers={"host": "anything.example"}).status_code == 200


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """An exported model folder of the tiny run."""
    from grad_jax import export

    out = tmp_path_factory.mktemp("exported") / "model"
    export.export_workdir(str(tiny_run[0]), str(out), platforms=("cpu",))
    return out


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_the_model_route_reveals_no_local_path(tiny_run, exported, predictor):
    run_dir, data_dir = tiny_run
    models = [
        load_scorer(model_dir=str(exported), batch_size=4),
        predictor,
        fake_scorer(meta=TWO_CLASSES),
    ]
    for model in models:
        with _app(model) as c:
            info = c.get("/v1/model").json()
        strings = list(_strings(info))
        assert strings and info["categories"] == model.categories
        for text in strings:
            assert not text.startswith(("/", "~")), text
            for secret in (str(run_dir), str(data_dir), str(exported), "parts/line3", "/home/op"):
                assert secret not in text, text
    assert info["meta"]["threshold"]["per_category"] == {"bolt": 0.95, "nut": 0.05}


# --------------------------------------------------------------------------------------------
# Slow clients and connections at once, on uvicorn as the command runs it (item 7).
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _uvicorn(app):
    """`app` served by uvicorn as `python -m grad_jax.serve` serves it, in a thread: its port."""
    import uvicorn

    server = uvicorn.Server(service.uvicorn_config(app, "127.0.0.1", 0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def _raw(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection, then read until the server closes it."""
    import socket

    from tests.serve_load_test import read_all

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        return read_all(sock)


def test_slow_clients_are_cut_off():
    from tests.serve_load_test import multipart

    app = service.create_app(fake_scorer(), LIMITS, warm_up=False, receive_timeout_s=1)
    body, content_type = multipart([("a.png", grey(26))])
    with _uvicorn(app) as port, concurrent.futures.ThreadPoolExecutor(3) as pool:
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        headers_only = pool.submit(_raw, port, b"POST /v1/predict HTT")  # 20 bytes, no more
        half_body = pool.submit(_raw, port, head + body[:20])
        whole = pool.submit(_raw, port, head.replace(b"HTTP/1.1", b"HTTP/1.0", 1) + body)
        assert headers_only.result(60) == b""  # closed: it never sent a request
        answer = half_body.result(60)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer[:200]
        assert b"did not arrive within 1 s (--receive_timeout_s)" in answer
        assert whole.result(60).startswith(b"HTTP/1.1 200 OK")


def test_connections_at_once_are_bounded():
    import http.client
    import socket

    app = service.create_app(fake_scorer(), LIMITS, warm_up=False, max_connections=3)
    with _uvicorn(app) as port:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 503  # uvicorn's limit_concurrency
            conn.close()
        finally:
            for sock in idle:
                sock.close()
        _wait_for(lambda: _healthz_status(port) == 200, "the idle connections to go")


def _healthz_status(port: int) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_serve_refuses_a_model_folder_other_than_the_pinned_one(tiny_run, tmp_path, capsys):
    """`--model_sha256` pins the folder digest export printed: another digest is refused at
    start with one line (exit 2), before anything is served."""
    from grad_jax import export, serve
    from grad_jax.inference import exported_model

    export.export_workdir(str(tiny_run[0]), str(tmp_path / "model"), platforms=("cpu",))
    digest = exported_model.folder_digest(tmp_path / "model")
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    argv = ["serve", f"--model={tmp_path / 'model'}", f"--model_sha256={wrong}", "--port=0"]
    assert serve.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and wrong in err
