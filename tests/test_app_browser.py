"""app.py in a real headless Chromium (selenium + the Debian chromium/chromium-driver packages):
type a prompt, generate, check the image shows it (shapes.score), step the round player, mark
cells and redraw them, and save a screenshot (docs/app.png when $EMAGE_SCREENSHOT names it). Bad input shows its message.

Skipped when /usr/bin/chromium or /usr/bin/chromedriver is missing (.ci/run installs them)."""
from __future__ import annotations

import base64
import io
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import app
import sample
import shapes

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# The README's picture is refreshed on request only (tests never write into the repository):
#   EMAGE_SCREENSHOT=docs/app.png python -m pytest tests/test_app_browser.py
SCREENSHOT_ENV = "EMAGE_SCREENSHOT"
PROMPT = "a red circle"  # with seed 0 and the default options the image passes shapes.score
WAIT = 60

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
                ".ci/run does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-test.txt)")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = app.make_server(sample.Pipeline.load(checkpoint=sample.DEMO_CHECKPOINT, device="cpu"), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the viewport of docs/app.png
                           {"width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


def message(driver) -> str:
    return driver.find_element(By.ID, "message").text


def submit_and_wait(driver, button: str, done: str) -> None:
    """Click a button and wait until #message says `done...` or an error."""
    driver.execute_script("document.getElementById('message').textContent = ''")
    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, WAIT).until(lambda d: message(d) and not message(d).endswith("\u2026"))
    assert message(driver).startswith(done), message(driver)


def type_into(driver, field: str, text: str) -> None:
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(text)


def shown_image(driver, element_id: str) -> Image.Image:
    src = driver.find_element(By.ID, element_id).get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return image.convert("RGB")


def test_generate_play_the_rounds_and_redraw(server, browser, tmp_path):
    driver = browser
    driver.get(server.url)
    assert driver.find_element(By.ID, "steps").get_attribute("value") == "16"
    assert driver.find_element(By.ID, "candidates").get_attribute("value") == str(sample.DEFAULT_CANDIDATES)

    # bad input: a clear message on the page, and the page keeps working
    type_into(driver, "prompt", "   ")
    driver.find_element(By.ID, "generate").click()
    assert "prompt is empty" in message(driver)
    type_into(driver, "prompt", PROMPT)
    type_into(driver, "steps", "many")
    submit_and_wait(driver, "generate", "steps must be a whole number between 1 and 1024")
    assert driver.find_element(By.ID, "message").get_attribute("class") == "error"
    type_into(driver, "steps", "16")

    submit_and_wait(driver, "generate", "done in")
    image = shown_image(driver, "result-image")
    assert image.size == (64, 64) and shapes.score(image, PROMPT)
    assert driver.find_element(By.ID, "download").get_attribute("download") == "a-red-circle-0.png"

    label = driver.find_element(By.ID, "round-label")
    assert label.text.startswith("round 16 / 16:"), label.text
    last_frame = driver.find_element(By.ID, "round-image").get_attribute("src")
    driver.find_element(By.ID, "prev").click()
    assert label.text.startswith("round 15 / 16:"), label.text
    assert driver.find_element(By.ID, "round-image").get_attribute("src") != last_frame

    # mark a 4 x 3 block of cells by dragging over the result (32 px cells on the 256 px display)
    grid = driver.find_element(By.ID, "select-grid")
    centre = lambda row, col: (col * 32 + 16 - 128, row * 32 + 16 - 128)  # noqa: E731  offsets from the middle
    (ActionChains(driver).move_to_element_with_offset(grid, *centre(1, 5)).click_and_hold()
     .move_to_element_with_offset(grid, *centre(4, 7)).release().perform())
    assert driver.find_element(By.ID, "selection-label").text == "12 of 64 cells marked"
    before = driver.execute_script("return current.tokens")
    type_into(driver, "edit-prompt", "a red circle to the left of a blue square")
    submit_and_wait(driver, "edit", "done in")
    after = driver.execute_script("return current.tokens")
    marked = {r * 8 + c for r in range(1, 5) for c in range(5, 8)}
    assert all(after[i] == before[i] for i in range(64) if i not in marked)
    assert driver.find_element(By.ID, "timing").text.startswith("redrawn in")
    for _ in range(6):  # a middle round: new, revised and kept cells side by side
        driver.find_element(By.ID, "prev").click()
    assert label.text.startswith("round 10 / 16:") and "kept" in label.text

    driver.execute_script("window.scrollTo(0, 0)")
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "app.png")
    assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    with Image.open(screenshot) as shot:
        assert shot.size == (1280, 860)

