"""End to end in a real headless Chromium: the page at / uploads images, draws boxes, filters them.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the
``selenium`` package; skipped with the reason when any is missing. The server is uvicorn on
a free loopback port, in a thread of this process.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from PIL import Image
from serve_fakes import FakeDetector, KNOWN

from metaldefect.serve.app import create_app

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "metaldefect" / "samples"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "serve-screenshot.png"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(f"Chromium or its driver not found ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 at a port the OS picks, in a daemon thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, seconds: float = 60, what: str = "the page"):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; page text: {page}") from None


def cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def boxes(card):
    return card.find_elements(By.CSS_SELECTOR, "svg.overlay rect.box")


def row_labels(card) -> list[str]:
    return [row.find_elements(By.TAG_NAME, "td")[1].text
            for row in card.find_elements(By.CSS_SELECTOR, "table.detections tbody tr")]


def upload(driver, files: list[Path]) -> None:
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))


def move_slider(driver, key: str, times: int) -> None:
    slider = driver.find_element(By.ID, "conf")
    slider.send_keys(*([key] * times))  # real key presses: each fires the slider's input event


def save_screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_page_draws_boxes_lists_defects_and_filters_them(browser, tmp_path):
    samples = [SAMPLES / "scratches_113.jpg", SAMPLES / "inclusion_113.jpg"]
    tiff = tmp_path / "wide.tif"  # a format Chromium cannot display: boxes go over a placeholder
    Image.new("L", (300, 100), 128).save(tiff)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    with Server(create_app(FakeDetector())) as url:
        browser.get(url + "/")
        wait_for(browser, lambda d: "fake-model" in d.find_element(By.ID, "model-info").text, what="the model info")
        assert "Box refiner" in browser.find_element(By.ID, "model-info").text
        assert browser.find_element(By.ID, "conf-value").text == "0.30"  # the model's threshold
        upload(browser, samples + [tiff, not_an_image])
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result[data-state=done]")) == 3
                 and d.find_elements(By.CSS_SELECTOR, ".result[data-state=error]"), what="the detections")

        done = browser.find_elements(By.CSS_SELECTOR, ".result[data-state=done]")
        above = [label for label, score, _ in KNOWN if score >= 0.3]  # scratches, inclusion, crazing
        for card in done:
            assert len(boxes(card)) == len(above)
            assert row_labels(card) == above
            assert "3 of 4 shown" in card.find_element(By.CLASS_NAME, "result-meta").text
        first = boxes(done[0])[0]  # scratches at (0.10, 0.15, 0.45, 0.55) of a 200 x 200 image
        assert [float(first.get_attribute(k)) for k in ("x", "y", "width", "height")] == pytest.approx([20, 30, 70, 80])
        assert [card.find_element(By.CLASS_NAME, "result-name").text for card in done] == \
               ["scratches_113.jpg", "inclusion_113.jpg", "wide.tif"]
        assert done[2].find_element(By.CLASS_NAME, "stage-placeholder").is_displayed()
        assert float(boxes(done[2])[0].get_attribute("x")) == pytest.approx(30)  # 0.10 of 300 px
        ActionChains(browser).move_to_element(done[0].find_elements(By.CSS_SELECTOR, "tbody tr")[1]).perform()
        assert done[0].find_elements(By.CSS_SELECTOR, "svg.overlay g.active") == \
               [done[0].find_elements(By.CSS_SELECTOR, "svg.overlay g")[1]]  # hovering a row lights its box
        error = browser.find_element(By.CSS_SELECTOR, ".result[data-state=error]")
        assert "is not an image" in error.find_element(By.CLASS_NAME, "status").text
        legend = {item.get_attribute("data-label"): item.find_element(By.CLASS_NAME, "legend-count").text
                  for item in browser.find_elements(By.CSS_SELECTOR, "#legend .legend-item")}
        assert legend == {"crazing": "3", "inclusion": "3", "patches": "0", "scratches": "3"}
        save_screenshot(browser, tmp_path / "serve-fake.png")

        move_slider(browser, Keys.ARROW_RIGHT, 25)  # 0.30 -> 0.55: crazing (0.34) goes
        assert browser.find_element(By.ID, "conf-value").text == "0.55"
        for card in done:
            assert row_labels(card) == ["scratches", "inclusion"]
            assert len(boxes(card)) == 2
        move_slider(browser, Keys.ARROW_LEFT, 45)  # 0.55 -> 0.10: patches (0.12) appears
        assert browser.find_element(By.ID, "conf-value").text == "0.10"
        for card in done:
            assert row_labels(card) == ["scratches", "inclusion", "crazing", "patches"]
            assert len(boxes(card)) == 4
        move_slider(browser, Keys.END, 1)  # 1.00: nothing left
        for card in done:
            assert boxes(card) == [] and row_labels(card) == []
            assert "No defect scores 1.00 or more" in card.find_element(By.CLASS_NAME, "status").text


def test_page_with_a_real_model(browser, tmp_path):
    """The built-in model (or the model named by $METALDEFECT_SERVE_TEST_MODEL) on the six samples."""
    from metaldefect.errors import MetalDefectError
    from metaldefect.inference.detector import Detector

    source = os.environ.get("METALDEFECT_SERVE_TEST_MODEL", "builtin")
    try:
        detector = Detector.load(source)
    except MetalDefectError as error:
        pytest.skip(f"no real model to serve ({error}); METALDEFECT_SERVE_TEST_MODEL=RUN names one")
    samples = sorted(SAMPLES.glob("*.jpg"))
    with Server(create_app(detector)) as url:
        browser.get(url + "/")
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model-info .chip"), what="the model info")
        upload(browser, samples)
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result[data-state=done]")) == len(samples),
                 seconds=180, what=f"the detections of {source}")
        drawn = 0
        for card in cards(browser):
            drawn += len(boxes(card))
            assert len(boxes(card)) == len(row_labels(card))
            assert set(row_labels(card)) <= set(detector.classes)
        assert drawn > 0
        browser.set_window_size(1280, 1500)  # room for two result cards in the picture
        browser.execute_script("window.scrollTo(0, 0)")
        save_screenshot(browser, tmp_path / "serve-real-model.png")
        if os.environ.get("METALDEFECT_UPDATE_SCREENSHOT"):  # maintainers: refresh the docs' picture
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_path / "serve-real-model.png", DOCS_SCREENSHOT)
