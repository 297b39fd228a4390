"""The inspection page in a real browser: Debian's chromium, driven by Selenium through
/usr/bin/chromedriver, against a real uvicorn server on loopback.

The browser uploads a good image, a defective one and a text file; the test finds each overlay,
score and decision on the page (scores against Predictor), moves the threshold slider with the
keyboard and sees the decisions change, downloads the CSV, changes the class (the images are
scored again), and saves a screenshot of the page (`serve_page.png` in the test's folder; the
README's picture is a copy of it).

Without chromium the test is skipped, except in CI (CI=true), where it fails: .ci/run installs
the browser.
"""

import csv
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from grad_jax import predict
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
    return predict.Predictor.from_workdir(tiny_run[0], batch_size=4)


@pytest.fixture(scope="module")
def server(predictor):
    """`(base URL, app)`: the service on a free loopback port, in a thread of this process."""
    import uvicorn

    app = service.create_app(predictor)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/", app
    server.should_exit = True
    thread.join(30)


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
