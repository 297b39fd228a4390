"""grad_jax.serving.service through FastAPI's TestClient, grad_jax.serving.batching, and the
serve command line.

The model is a real tiny trained run (the session fixture `tiny_run`); every score the service
returns is compared with `Predictor.predict` on the same image decoded independently.
"""

import base64
import concurrent.futures
import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from grad_jax import predict
from grad_jax.inference import heatmap
from grad_jax.inference.loader import load_scorer
from grad_jax.inference.scorer import Scorer, ScoringSpec
from grad_jax.serving import batching, service, uploads
from tfds_mvtec.mvtec_ad import layout

SIZE = (64, 64)  # configs/tiny.py
LIMITS = uploads.Limits(max_file_bytes=1_000_000, max_files=4, max_pixels=300_000, overlay_side=256)


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return predict.Predictor.from_workdir(tiny_run[0], batch_size=4)


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    app = service.create_app(predictor, LIMITS, max_wait_ms=5)
    with TestClient(app) as c:
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


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height gray pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


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
    assert "default-src 'self'" in r.headers["content-security-policy"]
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
    assert auto["calibrated"] == 0.75 and auto["decision"] == "anomalous"
    x = chosen["results"][0]
    assert (x["category"], x["threshold"], x["decision"]) == ("bolt", 0.9, "normal")
    assert model.seen == [None, "bolt"]  # no class given: None, for the scorer to recognise


# --------------------------------------------------------------------------------------------
# The batcher alone.
# --------------------------------------------------------------------------------------------


def test_batcher_collects_and_survives_a_failing_batch():
    calls, gate, entered = [], threading.Event(), threading.Semaphore(0)

    def run(items):
        calls.append(list(items))
        entered.release()
        assert gate.wait(30)
        if "boom" in items:
            raise RuntimeError("boom")
        return [x * 10 for x in items]

    b = batching.Batcher(run, batch_size=3, max_wait_s=0.002, max_queue=8)
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


def test_an_exported_model_serves_the_predictor_s_results(tiny_run, predictor, tmp_path):
    """`--model=DIR`: the service over `grad_jax.inference.exported_model` answers with
    Predictor's scores, classes, thresholds and decisions."""
    from fastapi.testclient import TestClient

    from grad_jax import export

    export.export_workdir(str(tiny_run[0]), str(tmp_path / "model"), platforms=("cpu",))
    model = load_scorer(model_dir=str(tmp_path / "model"), batch_size=4)
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
