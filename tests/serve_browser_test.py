"""The inspection page in a real browser: Debian's chromium, driven by Selenium through
/usr/bin/chromedriver, against a real uvicorn server on loopback (served as the command serves
it: `service.uvicorn_config`).

The browser uploads a good image, a defective one and a text file; the test finds each overlay,
score and decision on the page (scores against Predictor), moves the threshold slider with the
keyboard and sees the decisions change, downloads the CSV, changes the class (the images are
scored again), and saves a screenshot of the page (`serve_page.png` in the test's folder; the
README's picture is a copy of it). A second test, on a fake two-class model, checks what the
page does with an unknown class, a model error, file names that a spreadsheet would run as
formulas, and an answer for the old class that arrives after the class was changed.

Without chromium the test is skipped, except in CI (CI=true), where it fails: .ci/run installs
the browser.
"""

import contextlib
import csv
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from grad_jax.inference.predictor import Predictor
from grad_jax.inference.scorer import Scorer, ScoringSpec
from grad_jax.serving import service
from tfds_mvtec.mvtec_ad import layout

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 60
SCREENSHOT_LIMIT = 150_000


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = (
        f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver "
        "(.ci/run does this)"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the browser test cannot run in CI: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_workdir(tiny_run[0], batch_size=4)


@contextlib.contextmanager
def _serving(app):
    """The app on a free loopback port, in a thread of this process, once it is healthy: its
    base URL."""
    import http.client

    import uvicorn

    server = uvicorn.Server(service.uvicorn_config(app, "127.0.0.1", 0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    def healthy():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    _wait(healthy, "the warm-up")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(predictor):
    """`(base URL, app)`: the service of the tiny run."""
    app = service.create_app(predictor)
    with _serving(app) as url:
        yield url, app


@pytest.fixture
def browser(tmp_path, monkeypatch):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download anything
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1000,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(
        service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
        options=options,
    )
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition, what: str, timeout: float = WAIT_S):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _cards(driver) -> dict[str, dict]:
    """What the page shows for every file: decision, score, threshold text, overlay size."""
    return driver.execute_script(
        """
        const out = {};
        for (const card of document.querySelectorAll('#results .card')) {
          const text = (sel) => {
            const n = card.querySelector(sel);
            return n ? n.textContent : null;
          };
          const img = card.querySelector('img.overlay');
          out[card.dataset.file] = {
            state: card.dataset.decision || null, dataScore: card.dataset.score || null,
            badge: text('.decision'), score: text('dd.score'), threshold: text('dd.threshold'),
            category: text('dd.category'), message: text('.message'),
            overlay: img && img.complete ? [img.naturalWidth, img.naturalHeight] : null };
        }
        return out;
        """
    )


def _settled(driver, names) -> dict | None:
    cards = _cards(driver)
    done = set(names) <= set(cards) and all(
        cards[n]["state"] in ("anomalous", "normal", "error") for n in names
    )
    return cards if done else None


def _files(tiny_run, tmp_path) -> dict[str, object]:
    base = tiny_run[1] / "test"
    defect = next(d for d in sorted(os.listdir(base)) if d != "good")
    chosen = {
        "good.png": base / "good" / sorted(os.listdir(base / "good"))[0],
        "defect.png": base / defect / sorted(os.listdir(base / defect))[0],
    }
    folder = tmp_path / "upload"
    folder.mkdir()
    paths = {}
    for name, source in chosen.items():
        shutil.copy(source, folder / name)
        paths[name] = folder / name
    (folder / "notes.png").write_text("this is not an image\n")
    paths["notes.png"] = folder / "notes.png"
    return paths


def test_page_in_a_real_browser(browser, server, predictor, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    url, app = server
    paths = _files(tiny_run, tmp_path)
    good = ["good.png", "defect.png"]
    want = {n: predictor.predict([layout.load_rgb(paths[n])])[0] for n in good}
    threshold = predictor.threshold

    browser.get(url)
    _wait(lambda: "hex_nut" in browser.find_element(By.ID, "model-info").text, "the model info")
    # the Content-Security-Policy lets the inline script run (above) and the inline style apply
    header = "return getComputedStyle(document.querySelector('header')).backgroundColor"
    assert browser.execute_script(header) == "rgb(29, 35, 42)"
    browser.find_element(By.ID, "files").send_keys("\n".join(str(paths[n]) for n in paths))
    cards = _wait(lambda: _settled(browser, list(paths)), "the three results")

    initial = {}
    for name in good:
        card, p = cards[name], want[name]
        assert card["overlay"] == [80, 80], card  # the overlay image, at the upload's size
        assert float(card["dataScore"]) == pytest.approx(p.score, rel=1e-5)
        assert float(card["score"]) == pytest.approx(p.score, rel=1e-3)  # 4 digits shown
        decision = "anomalous" if p.score >= threshold else "normal"
        assert (card["state"], card["badge"]) == (decision, decision.upper())
        assert card["category"] == "hex_nut" and "hex_nut" in card["threshold"]
        initial[name] = decision
    assert cards["notes.png"]["state"] == "error"
    assert "not a recognised image" in cards["notes.png"]["message"]

    # the threshold slider, moved with the keyboard: lowest -> all anomalous, highest -> normal
    slider = browser.find_element(By.ID, "threshold")
    assert float(slider.get_attribute("value")) == pytest.approx(threshold, rel=1e-6)
    changed = set()
    for key, decision in ((Keys.HOME, "anomalous"), (Keys.END, "normal")):
        slider.send_keys(key)
        cards = _cards(browser)
        for name in good:
            assert (cards[name]["state"], cards[name]["badge"]) == (decision, decision.upper())
            assert "set on this page" in cards[name]["threshold"]
            changed |= {name} if decision != initial[name] else set()
    assert changed == set(good)  # each image's decision flipped at one end of the slider
    assert browser.find_element(By.ID, "threshold-source").text == "(set on this page)"
    assert float(slider.get_attribute("value")) > max(p.score for p in want.values())

    # the CSV, downloaded as a person would
    browser.find_element(By.ID, "download").click()
    csv_path = browser.downloads / "grad_jax_results.csv"
    _wait(lambda: csv_path.is_file() and csv_path.stat().st_size > 0, "the CSV download")
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
    assert [r["file"] for r in rows] == list(paths)
    for r in rows[:2]:
        assert float(r["score"]) == pytest.approx(want[r["file"]].score, rel=1e-6)
        assert (r["decision"], r["threshold_source"], r["class"]) == (
            "normal",
            "set on this page",
            "hex_nut",
        )
    assert rows[2]["score"] == "" and "not a recognised image" in rows[2]["error"]

    # back to the model's threshold, then another class: the images are scored again
    browser.find_element(By.ID, "reset-threshold").click()
    cards = _cards(browser)
    assert {n: cards[n]["state"] for n in good} == initial
    served = app.state.batcher.items
    Select(browser.find_element(By.ID, "category")).select_by_value("hex_nut")
    _wait(lambda: app.state.batcher.items == served + 2, "the images to be scored again")
    cards = _wait(lambda: _settled(browser, list(paths)), "the new results")
    assert {n: cards[n]["state"] for n in good} == initial

    # the screenshot for the README: small enough to commit
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    small = shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(tmp_path / "serve_page.png", optimize=True)
    size = (tmp_path / "serve_page.png").stat().st_size
    assert size < SCREENSHOT_LIMIT, size
    assert np.asarray(shot).std() > 10  # not a blank page


# --------------------------------------------------------------------------------------------
# Unknown classes, model errors, CSV cells and late answers, on a fake two-class model.
# --------------------------------------------------------------------------------------------


class BrightnessProgram:
    """Score and pooled feature = mean brightness (0..1); NaN for an all-white image."""

    def rows(self, n):
        return n

    def __call__(self, images):
        mean = images.reshape(len(images), -1).mean(axis=1) / 255.0
        maps = np.broadcast_to(mean[:, None, None], (len(images), 32, 32)).astype(np.float32)
        score = np.where(mean > 0.999, np.nan, mean)
        return {"raw": maps, "smoothed": maps, "score": score, "pooled": mean[:, None]}


class TwoClassScorer(Scorer):
    """'nut' is dark (about 0.1), 'bolt' bright (about 0.9), each within 0.05 of its class
    centre; a mid-grey image is neither (an unknown class). While `hold` is set, a decision
    without a class waits for `release`; `held` counts those that went through."""

    def __init__(self):
        meta = {
            "categories": ["bolt", "nut"],
            "threshold": {
                "image_score": 0.5,
                "per_category": {"bolt": 0.95, "nut": 0.05},
                "normal_scores": {"bolt": [0.9] * 4, "nut": [0.1] * 4},
            },
            "class_centres": {
                "names": ["bolt", "nut"],
                "centres": [[0.9], [0.1]],
                "radii": [0.05, 0.05],
            },
        }
        super().__init__(BrightnessProgram(), ScoringSpec((32, 32), 5, 8), meta, batch_size=4)
        self.hold, self.release, self.held = False, threading.Event(), 0

    def decide(self, scored, categories=None, threshold=None):
        if self.hold and categories is None:
            assert self.release.wait(WAIT_S)
            self.held += 1
        return super().decide(scored, categories, threshold)


def _csv_cell(text: str) -> str:
    """What the page's CSV should hold for a text cell (written here from RFC 4180 and the
    OWASP rule for formula injection, not from the page)."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    if any(c in text for c in '",\n\r'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def test_unknown_class_errors_csv_cells_and_late_answers(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model = TwoClassScorer()
    folder = tmp_path / "upload"
    folder.mkdir()
    paths = {}
    for name, value in (("=1+2.png", 26), ("mid.png", 128), ("white.png", 255)):
        Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(folder / name)
        paths[name] = folder / name
    (folder / "@notes.png").write_text("this is not an image\n")
    paths["@notes.png"] = folder / "@notes.png"

    with _serving(service.create_app(model)) as url:
        browser.get(url)
        _wait(lambda: "bolt, nut" in browser.find_element(By.ID, "model-info").text, "the model")
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths.values()))
        cards = _wait(lambda: _settled_all(browser, list(paths)), "the four results")

        # a dark part is a nut, decided with the nut's threshold
        dark = cards["=1+2.png"]
        assert (dark["state"], dark["category"]) == ("anomalous", "nut")
        # a mid-grey part is neither class: shown as such, not decided
        mid = cards["mid.png"]
        assert (mid["state"], mid["badge"]) == ("unknown", "UNKNOWN CLASS (NO DECISION)")
        assert mid["category"] == "unknown class (no decision)"
        # a non-finite score is an error card naming the file, never a decision
        white = cards["white.png"]
        assert white["state"] == "error" and white["badge"] is None
        assert white["message"].startswith("white.png: the model gave a non-finite score")
        assert "(HTTP 500)" in white["message"]
        assert cards["@notes.png"]["state"] == "error"

        # the slider decides known classes only
        browser.find_element(By.ID, "threshold").send_keys("\ue010")  # End
        cards = _cards(browser)
        assert cards["=1+2.png"]["state"] == "normal" and cards["mid.png"]["state"] == "unknown"

        # the CSV: cells a spreadsheet would run are text, and the quoting is RFC 4180's
        browser.find_element(By.ID, "download").click()
        csv_path = browser.downloads / "grad_jax_results.csv"
        _wait(lambda: csv_path.is_file() and csv_path.stat().st_size > 0, "the CSV download")
        text = csv_path.read_text(encoding="utf-8")
        lines = text.splitlines()
        assert lines[1].startswith("'=1+2.png,nut,") and lines[1].endswith(",normal,")
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["file"] for r in rows] == ["'=1+2.png", "mid.png", "white.png", "'@notes.png"]
        assert (rows[1]["class"], rows[1]["decision"], rows[1]["threshold"]) == (
            "unknown class",
            "",
            "",
        )
        assert rows[3]["error"].startswith("'@notes.png: ")
        cases = ["=cmd|' /C calc'!A0", "+1", "-1", "@SUM(A1)", "\tx", "\rx", 'a,"b"', "plain", ""]
        written = browser.execute_script("return arguments[0].map(csvField)", cases)
        assert written == [_csv_cell(c) for c in cases]

        # late answers: an automatic-class request is still on its way when the class changes
        browser.find_element(By.ID, "reset-threshold").click()
        browser.find_element(By.ID, "clear").click()
        model.hold = True
        browser.find_element(By.ID, "files").send_keys(str(paths["mid.png"]))
        _wait(lambda: browser.find_element(By.ID, "status").text, "the request to be sent")
        Select(browser.find_element(By.ID, "category")).select_by_value("nut")
        cards = _wait(lambda: _settled_all(browser, ["mid.png"]), "the nut result")
        assert (cards["mid.png"]["state"], cards["mid.png"]["category"]) == ("anomalous", "nut")
        model.release.set()  # now the automatic answer (an unknown class) arrives
        _wait(lambda: model.held == 1, "the old answer")
        _wait(lambda: browser.find_element(By.ID, "status").text == "", "the page to take it")
        cards = _cards(browser)
        assert (cards["mid.png"]["state"], cards["mid.png"]["category"]) == ("anomalous", "nut")


def _settled_all(driver, names) -> dict | None:
    cards = _cards(driver)
    done = set(names) <= set(cards) and all(
        cards[n]["state"] in ("anomalous", "normal", "error", "unknown", "none") for n in names
    )
    return cards if done else None
