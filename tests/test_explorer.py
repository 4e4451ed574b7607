"""The explorer page (api/http/static/) in a real headless Chromium: Debian's chromium package
(/usr/bin/chromium, which .ci/run installs), driven by Playwright, which downloads nothing.
Upload the cat photo, see "Egyptian cat" and its map on the cat, choose another class and a
second method, see the grid, its faithfulness plot and the sanity-check table; keyboard and a
phone's width; the live mode on Chromium's fake camera. No console errors throughout.

    CAMSERVE_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_explorer.py

writes the screenshots into docs/ (docs/explorer.png, docs/explorer-live.png) as well as into
the test's folder.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import running

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync",
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
# Where the cat is in tests/data/chelsea.jpg (451 x 300): all but the background on the right.
CAT = (0, 0, 370, 300)  # left, top, right, bottom

sync_api = pytest.importorskip("playwright.sync_api", reason="the explorer test needs Playwright")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def base():
    with running(http_port=0, max_delay_ms=20) as (server, _):
        yield f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(120_000)
    yield page
    context.close()
    assert not problems, f"console errors: {problems}"


def save(page, name: str, folder: Path) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CAMSERVE_SCREENSHOTS") == "docs":  # 256 colours: a fifth of the bytes
        Image.open(path).convert("RGB").quantize(256).save(DOCS / name, optimize=True)
    return path


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                      ).astype(int)


def hottest(heat: np.ndarray):
    """(x, y) of the hottest 15 x 15 block of a grey heatmap (one pixel cannot decide)."""
    h, w = heat.shape
    cell = 15
    pooled = heat[:h // cell * cell, :w // cell * cell].reshape(h // cell, cell, w // cell,
                                                                cell).mean(axis=(1, 3))
    y, x = np.unravel_index(np.argmax(pooled), pooled.shape)
    return (x + 0.5) * cell, (y + 0.5) * cell


def test_upload_the_cat_then_another_class_and_a_second_method(page, base, cat_path,
                                                               tmp_path):
    page.goto(base + "/")
    page.wait_for_selector("input[name=method]", state="attached")
    page.set_input_files("#file", str(cat_path))
    first = page.locator(".class").first
    first.wait_for()
    assert first.locator("span").first.inner_text() == "Egyptian cat"
    page.wait_for_function("document.getElementById('heat').src.startsWith('data:')")
    assert "Egyptian cat" in page.inner_text("#view-caption")
    # The map the page colours and lays over the photo: the server's heatmap PNG, grey.
    heat = data_url_image(page.get_attribute("#heat", "data-heatmap"))
    assert heat.shape == (300, 451) and heat.max() - heat.min() > 200
    shown = data_url_image(page.get_attribute("#heat", "src"))
    assert shown.shape == (300, 451, 4)  # coloured: jet, blue low and red high
    hot = np.unravel_index(np.argmax(heat), heat.shape)
    assert shown[hot][0] > 100 and shown[hot][2] < 50
    x, y = hottest(heat)
    assert CAT[0] <= x <= CAT[2] and CAT[1] <= y <= CAT[3], (x, y)

    # Another class: its map replaces the first.
    before = page.get_attribute("#heat", "data-heatmap")
    second = page.locator(".class").nth(1)
    second_label = second.locator("span").first.inner_text()
    second.click()
    page.wait_for_function("src => document.getElementById('heat').dataset.heatmap !== src",
                           arg=before)
    assert second_label in page.inner_text("#view-caption")
    assert second.get_attribute("aria-pressed") == "true"

    # A second method, then the grid: 2 classes x 2 methods.
    page.locator("input[name=method]").nth(1).check()
    page.check("#faithfulness")
    page.click("#grid-button")
    page.wait_for_selector("#grid figure.cell")
    assert page.locator("#grid figure.cell").count() == 4
    heads = page.locator("#grid .head").all_inner_texts()
    assert "Egyptian cat" in heads and second_label in heads
    assert "gradcam" in heads
    assert page.locator("#faith-svg rect").count() == 8
    page.fill("#opacity", "0.8")
    page.dispatch_event("#opacity", "input")
    opacities = page.eval_on_selector_all("img.heat", "els => els.map(e => e.style.opacity)")
    assert set(opacities) == {"0.8"}
    page.fill("#opacity", "0.5")
    page.dispatch_event("#opacity", "input")

    # The sanity checks of the two methods: a row each, with its randomisation curve.
    page.click("#sanity-button")
    page.wait_for_selector("#sanity tbody tr")
    rows = page.locator("#sanity tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).locator("th").inner_text() == "gradcam"
    assert page.locator("#sanity tbody polyline").count() == 2
    assert rows.nth(0).locator("td").nth(1).inner_text() in ("yes", "no")
    shot = save(page, "explorer.png", tmp_path)
    assert Image.open(shot).size[0] == 1200


def test_keyboard_and_a_phones_width(browser, base, cat_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.set_default_timeout(120_000)
    try:
        page.goto(base + "/")
        page.set_input_files("#file", str(cat_path))
        page.locator(".class").first.wait_for()
        page.wait_for_function("document.getElementById('heat').src.startsWith('data:')")
        page.locator(".class").nth(2).focus()
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.querySelectorAll('.class')[2].getAttribute('aria-pressed') === 'true'")
        wide = page.evaluate("document.documentElement.scrollWidth")
        assert wide <= 390, f"the page is {wide} px wide on a 390 px screen"
    finally:
        context.close()
    assert not errors, errors


def test_live_mode_streams_the_fake_camera(page, base, tmp_path):
    page.goto(base + "/")
    page.wait_for_selector("input[name=method]", state="attached")
    page.click("#live-start")
    page.wait_for_function("document.getElementById('live-overlay').src.startsWith('data:')")
    page.wait_for_function(
        "parseFloat(document.getElementById('fps').textContent) > 0")
    fps = float(re.match(r"([\d.]+) fps", page.inner_text("#fps")).group(1))
    assert fps > 0
    assert page.inner_text("#live-label")
    save(page, "explorer-live.png", tmp_path)
    page.click("#live-stop")
    assert page.locator("#live").is_hidden()
