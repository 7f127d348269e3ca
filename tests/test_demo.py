"""The demo page (app.py) served on a free local port and driven in headless Chromium: it draws digits, shows a
trajectory, inverts and redraws an uploaded digit, and says a bad input in one line while the server keeps going."""
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import PRETRAINED

ROOT = Path(__file__).resolve().parents[1]
BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page():
    """(browser, url) of app.py serving the committed models; the server and the browser end with the module."""
    if not (BROWSER and DRIVER):
        pytest.skip("no headless Chromium here: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--checkpoint",
                               str(PRETRAINED / "mnist-1rf"), "--data-root", "no-such-folder"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):  # torch and gradio import, then the server answers
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.5)
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    browser.get(url)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#draw-button"))
    try:
        yield browser, url
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)


def run(browser, tab: str, button: str, info: str, image: str | None = None, timeout: float = 60):
    """Open tab, press button, wait for its one-line answer (and image): (answer text, the image served, or None)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{tab}')]").click()
    answer = browser.find_element(By.CSS_SELECTOR, f"#{info}")
    before = answer.text
    browser.find_element(By.CSS_SELECTOR, f"#{button}").click()
    WebDriverWait(browser, timeout).until(lambda b: answer.text and answer.text != before)
    if image is None or answer.text.startswith("error"):
        return answer.text, None
    img = WebDriverWait(browser, timeout).until(lambda b: b.find_elements(By.CSS_SELECTOR, f"#{image} img"))[0]
    with urllib.request.urlopen(img.get_attribute("src")) as response:
        return answer.text, Image.open(io.BytesIO(response.read())).convert("L")


def type_into(browser, box: str, text: str) -> None:
    """Replace a text box's contents by keystrokes, as a person would (clear() would bypass the page's events)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.CSS_SELECTOR, f"#{box} textarea, #{box} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def test_the_page_draws_ten_digits_and_says_what_they_cost(page):
    browser, _ = page
    text, grid = run(browser, "Draw", "draw-button", "draw-info", "draw-image")
    assert "10 images, midpoint, 4 step(s), guidance w = 1.1: 16 NFE per image" in text
    assert grid.size == ((10 * 30 + 2) * 3, 32 * 3)  # one row of ten 28 px digits, 2 px apart, scaled 3x
    digits = np.asarray(grid)[6:-6, 6:-6]
    assert digits.std() > 40 and (digits > 200).mean() > 0.02  # white strokes on black, not a blank or grey grid


def test_a_bad_input_is_one_line_on_the_page_and_the_server_keeps_serving(page):
    browser, _ = page
    type_into(browser, "draw-steps", "0")
    text, _ = run(browser, "Draw", "draw-button", "draw-info")
    assert text == "error: steps must lie in 1..100,000 for midpoint, got 0"
    type_into(browser, "draw-steps", "")
    type_into(browser, "draw-guidance", "nan")
    text, _ = run(browser, "Draw", "draw-button", "draw-info")
    assert text.startswith("error: guidance must be a finite number")
    type_into(browser, "draw-guidance", "")
    text, grid = run(browser, "Draw", "draw-button", "draw-info", "draw-image")
    assert "16 NFE" in text and grid.size[0] > 0


def test_the_trajectory_shows_the_flows_path_the_straight_line_and_the_one_step_jump(page):
    browser, _ = page
    text, strip = run(browser, "Trajectory", "path-button", "path-info", "path-image")
    assert "the flow: midpoint, 4 step(s)" in text and "the one-step model: meanflow, 1 step(s)" in text
    rows = np.asarray(strip)
    assert strip.height == (3 * 30 + 2) * 3  # three rows: the flow, the straight line, the one-step jump
    assert rows.std() > 30


def test_an_uploaded_digit_is_inverted_and_redrawn_as_every_class(page, tmp_path):
    from selenium.webdriver.common.by import By

    browser, _ = page
    digit = Image.new("L", (28, 28), 255)  # a dark "1" on white, as one draws it: the page inverts it
    digit.paste(0, (12, 4, 16, 24))
    digit.save(tmp_path / "one.png")
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Edit')]").click()
    browser.find_element(By.CSS_SELECTOR, "#edit-upload input[type=file]").send_keys(str(tmp_path / "one.png"))
    time.sleep(1)
    text, grid = run(browser, "Edit", "edit-button", "edit-info", "edit-image")
    assert "its reconstruction" in text and "redrawn as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in text
    assert grid.size == ((12 * 30 + 2) * 4, 32 * 4)  # the image, its reconstruction, ten classes


def test_the_pages_handlers_say_each_refusal_in_one_line_and_draw_photo_models_by_class_name(tmp_path):
    import app
    from helpers import TINY, tiny_checkpoint

    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    draw = app.safely(app.draw)
    assert draw(str(bad), ["0"], 1, "recorded", "", "", 0) == (None, f"**error:** checkpoint {bad} is truncated or "
                                                                     "not a PyTorch checkpoint (UnpicklingError)")
    photos = tmp_path / "photos.pth"
    tiny_checkpoint(photos, replace(TINY, in_channels=3))
    checkpoint = torch.load(photos, weights_only=True)
    torch.save({**checkpoint, "class_names": ["cat", "dog", "ship"]}, photos)
    assert draw(str(photos), [], 1, "recorded", "", "", 0)[1] == "**error:** pick at least one class"
    assert draw(str(photos), ["ship"], 2, "euler", "x", "", 0)[1] == "**error:** steps must be a number, got 'x'"
    grid, text = draw(str(photos), ["dog", "ship"], 2, "euler", "2", "1", 0)
    assert "4 images, euler, 2 step(s), guidance w = 1: **2 NFE** per image" in text
    assert Image.open(grid).mode == "RGB" and Image.open(grid).height == (2 * 10 + 2) * 3  # a row per class
    edit = app.safely(app.edit)
    blank = {"background": None, "layers": [], "composite": Image.new("RGBA", (200, 200), (0, 0, 0, 0))}
    assert edit(str(photos), str(tmp_path), None, None, blank, "cat", ["dog"])[1].startswith(
        "**error:** pick a test digit (an index from 0), or upload or draw an image")
    sketch = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    sketch.paste((0, 0, 0, 255), (90, 20, 110, 180))  # a stroke drawn on the pad, transparent around it
    grid, text = edit(str(photos), str(tmp_path), None, None, {**blank, "composite": sketch}, "cat", ["dog", "ship"])
    assert "redrawn as dog, ship" in text and Image.open(grid).width == (4 * 10 + 2) * 4
