"""The explorer page (api/http/static/) in a real headless Chromium: Debian's chromium package
(/usr/bin/chromium, which .ci/run installs), driven by Playwright, which downloads nothing.
Upload the cat photo, see "Egyptian cat" and its map on the cat, choose another class and a
second method, see the grid, its faithfulness plot and the sanity-check table; the explain
options as the request's ExplainOptions fields, and the server's refusal of a combination in
the status line; the target kinds a model accepts; an embedding model's similarity to a
concept image; keyboard and a phone's width; the live mode on Chromium's fake camera. No
console errors throughout (but the refused request's own).

    CAMSERVE_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_explorer.py

writes the screenshots into docs/ (docs/explorer.png, docs/explorer-similarity.png,
docs/explorer-live.png) as well as into the test's folder.
"""

from __future__ import annotations

import base64
import io
import json
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


@pytest.fixture(scope="module")
def embedding_base():
    """An embedding model: test_embeddings.py's headless resnet18 (512 values, no classes)."""
    with running(http_port=0, max_delay_ms=20, model="python:test_embeddings:embedder",
                 output_activation="embedding", layers=("layer4",)) as (server, _):
        yield f"http://127.0.0.1:{server.http_port}"


# Chromium's console line for an answer with an error status: the refusal test's own request.
REFUSED = "Failed to load resource: the server responded with a status of 400"


@pytest.fixture()
def expected_errors() -> list:
    """The beginnings of the console errors a test expects (none unless it adds some)."""
    return []


@pytest.fixture()
def page(browser, expected_errors):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_default_timeout(120_000)
    yield page
    context.close()
    problems = [p for p in problems if not p.startswith(tuple(expected_errors))]
    assert not problems, f"console errors: {problems}"


def save(page, name: str, folder: Path, docs: bool = True) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    # 256 colours: a fifth of the bytes
    if docs and os.environ.get("CAMSERVE_SCREENSHOTS") == "docs":
        Image.open(path).convert("RGB").quantize(256).save(DOCS / name, optimize=True)
    return path


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                      ).astype(int)


def is_explain(response) -> bool:
    return response.url.endswith("/v1/explain")


def recording(page) -> dict:
    """The bodies of the page's POST /v1/explain calls by request, read on their way (a route:
    Chromium gives page.on("request") no body with a file in it, a route one without the
    file's bytes)."""
    bodies = {}

    def through(route):
        bodies[route.request] = route.request.post_data_buffer
        route.continue_()

    page.route("**/v1/explain", through)
    return bodies


def sent(bodies: dict, response) -> tuple:
    """The ExplainOptions JSON of the page's multipart POST /v1/explain that ``response``
    answers, and its image count."""
    body = bodies[response.request]
    part = re.search(rb'name="options"\r\n\r\n(.*?)\r\n--', body, re.S)
    assert part, body[:200]
    return json.loads(part.group(1)), body.count(b'name="images"')


def shows(page, answer) -> None:
    """Wait until the view shows the answer's first map (the first image's), coloured."""
    page.wait_for_function(
        "b64 => { const heat = document.getElementById('heat');"
        " return heat.dataset.heatmap === 'data:image/png;base64,' + b64 &&"
        " heat.src.startsWith('data:'); }", arg=answer["results"][0]["maps"][0]["heatmapPng"])


def upload(page, base, image) -> None:
    page.goto(base + "/")
    page.wait_for_selector("input[name=method]", state="attached")
    page.set_input_files("#file", str(image))
    page.wait_for_function("document.getElementById('heat').src.startsWith('data:')")


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


def test_the_explain_options_go_into_the_request(page, base, cat_path, tmp_path):
    """Target kind softmax and eigen_smooth with Grad-CAM: the view's request carries them and
    its map renders; counterfactual and aug_smooth; then a grid with Score-CAM on 8 channels,
    keep_sign and faithfulness in 4 steps."""
    bodies = recording(page)
    upload(page, base, cat_path)
    kinds = page.eval_on_selector_all("#target-kind option", "os => os.map(o => o.value)")
    assert kinds == ["TARGET_KIND_" + k for k in ("LOGIT", "SOFTMAX", "REST", "RAW_SCORES",
                                                  "FINER")]
    assert page.input_value("#target-kind") == "TARGET_KIND_LOGIT"
    with page.expect_response(is_explain):  # each option re-explains the view
        page.select_option("#target-kind", "TARGET_KIND_SOFTMAX")
    with page.expect_response(is_explain) as answered:
        page.check("#eigen-smooth")
    options, images = sent(bodies, answered.value)
    assert images == 1
    assert options == {"targetKind": "TARGET_KIND_SOFTMAX", "eigenSmooth": True,
                       "methods": ["CAM_METHOD_GRADCAM"], "layers": ["bn2"],
                       "targets": [{"classIndex": 285}],
                       "outputs": ["EXPLAIN_OUTPUT_HEATMAP_PNG"]}
    answer = answered.value.json()
    assert answer["results"][0]["maps"][0]["targetKind"] == "TARGET_KIND_SOFTMAX"
    shows(page, answer)
    assert page.inner_text("#view-caption") == "Egyptian cat · softmax · gradcam · bn2"
    x, y = hottest(data_url_image(page.get_attribute("#heat", "data-heatmap")))
    assert CAT[0] <= x <= CAT[2] and CAT[1] <= y <= CAT[3], (x, y)
    assert not page.get_attribute("#status", "class")

    # Counterfactual and aug_smooth (7 explanations of the image), then without aug_smooth.
    with page.expect_response(is_explain):
        page.check("#counterfactual")
    with page.expect_response(is_explain) as answered:
        page.check("#aug-smooth")
    options, _ = sent(bodies, answered.value)
    assert {k: options.get(k) for k in ("targetKind", "eigenSmooth", "augSmooth",
                                        "counterfactual", "keepSign")} == {
        "targetKind": "TARGET_KIND_SOFTMAX", "eigenSmooth": True, "augSmooth": True,
        "counterfactual": True, "keepSign": None}
    shows(page, answered.value.json())
    with page.expect_response(is_explain):
        page.uncheck("#aug-smooth")

    # Score-CAM: its channel count appears; the grid's request carries every option.
    assert page.locator("#channels-label").is_hidden()
    page.check("input[name=method][value=CAM_METHOD_SCORECAM]")
    assert page.locator("#channels-label").is_visible()
    assert page.get_attribute("#steps", "max") == "256"
    assert page.get_attribute("#score-cam-channels", "max") == "256"
    page.fill("#score-cam-channels", "8")
    with page.expect_response(is_explain):  # a number is changed once the field is left
        page.locator("#score-cam-channels").blur()
    with page.expect_response(is_explain):
        page.check("#keep-sign")
    page.check("#faithfulness")
    page.fill("#steps", "4")
    with page.expect_response(is_explain) as answered:
        page.click("#grid-button")
    options, _ = sent(bodies, answered.value)
    assert options == {"targetKind": "TARGET_KIND_SOFTMAX", "eigenSmooth": True,
                       "counterfactual": True, "keepSign": True, "scoreCamChannels": 8,
                       "faithfulnessSteps": 4,
                       "methods": ["CAM_METHOD_GRADCAM", "CAM_METHOD_SCORECAM"],
                       "layers": ["bn2"], "targets": [{"classIndex": 285}],
                       "outputs": ["EXPLAIN_OUTPUT_HEATMAP_PNG"]}
    page.wait_for_selector("#grid figure.cell")
    assert page.locator("#grid figure.cell").count() == 2
    assert page.locator("#grid .head").all_inner_texts()[1:] == ["gradcam", "scorecam",
                                                                 "Egyptian cat"]
    maps = answered.value.json()["results"][0]["maps"]
    assert [m["faithfulness"]["steps"] for m in maps] == [4, 4]
    page.wait_for_function("[...document.querySelectorAll('#grid img.heat')]"
                           ".every(i => i.src.startsWith('data:'))")
    assert page.locator("#faith-svg rect").count() == 4
    save(page, "explorer-options.png", tmp_path, docs=False)

    # ROAD alone: its percentiles sent, its combined score in the caption, no curves plotted.
    page.uncheck("input[name=method][value=CAM_METHOD_SCORECAM]")
    page.uncheck("#faithfulness")
    page.check("#road")
    with page.expect_response(is_explain) as answered:
        page.click("#grid-button")
    options, _ = sent(bodies, answered.value)
    assert options["roadPercentiles"] == list(range(10, 100, 10))
    assert "faithfulnessSteps" not in options
    page.wait_for_selector("#grid figure.cell")
    assert " · ROAD " in page.locator("#grid figure.cell figcaption").first.inner_text()
    assert page.locator("#faith-svg rect").count() == 0


def test_a_refused_combination_says_the_servers_message(page, base, cat_path, expected_errors):
    """eigen_smooth with EigenCAM, whose map is no sum over channels: the server's message in
    the status line; unticking it brings the map back."""
    expected_errors.append(REFUSED)
    upload(page, base, cat_path)
    page.uncheck("input[name=method][value=CAM_METHOD_GRADCAM]")
    page.check("input[name=method][value=CAM_METHOD_EIGENCAM]")
    with page.expect_response(is_explain) as answered:
        page.check("#eigen-smooth")
    assert answered.value.status == 400
    refusal = answered.value.json()
    assert refusal["code"] == 3  # INVALID_ARGUMENT
    assert "CAM_METHOD_EIGENCAM" in refusal["message"]
    page.wait_for_selector("#status.error")
    assert page.inner_text("#status") == refusal["message"]
    with page.expect_response(is_explain) as answered:
        page.uncheck("#eigen-smooth")
    assert answered.value.ok
    shows(page, answered.value.json())
    assert "eigencam" in page.inner_text("#view-caption")
    page.wait_for_function("!document.getElementById('status').classList.contains('error')")


@pytest.mark.parametrize("activation, kinds", [
    ("softmax", ["LOGIT", "SOFTMAX", "REST", "RAW_SCORES", "FINER"]),
    ("sigmoid", ["LOGIT", "SIGMOID", "RAW_SCORES"]),
    ("embedding", ["RAW_SCORES"]),
])
def test_the_target_kinds_are_the_models(page, base, activation, kinds):
    """The target kind select lists what GetModelInfo's outputActivation accepts (the info
    answer rewritten in flight: one server serves one kind)."""
    def info(route):
        answer = route.fetch()
        body = answer.json()
        body["outputActivation"] = activation
        route.fulfill(response=answer, json=body)

    page.route("**/v1/info", info)
    page.goto(base + "/")
    page.wait_for_selector("#target-kind option", state="attached")
    shown = page.eval_on_selector_all("#target-kind option", "os => os.map(o => o.value)")
    assert shown == ["TARGET_KIND_" + k for k in kinds]


def test_an_embedding_models_similarity_to_a_concept_image(page, embedding_base, cat_path,
                                                           coffee_path, tmp_path):
    """No classes; the coffee photo as the concept: the request's second image, with
    similar_to_image 2 and target kind SIMILARITY; the cat's map and its similarity."""
    bodies = recording(page)
    upload(page, embedding_base, cat_path)
    assert "embedding of 512 values" in page.inner_text("#model")
    assert page.locator(".class").count() == 0
    assert "No classes" in page.inner_text("#classes-hint")
    assert "raw scores" in page.inner_text("#view-caption")
    with page.expect_response(is_explain) as answered:
        page.set_input_files("#concept", str(coffee_path))
    options, images = sent(bodies, answered.value)
    assert images == 2
    assert options == {"targetKind": "TARGET_KIND_SIMILARITY", "similarToImage": 2,
                       "methods": ["CAM_METHOD_GRADCAM"], "layers": ["layer4"],
                       "outputs": ["EXPLAIN_OUTPUT_HEATMAP_PNG"]}
    answer = answered.value.json()
    assert len(answer["results"]) == 2
    similarity = answer["results"][0]["maps"][0]["similarity"]
    assert -1 <= similarity < 1  # the cat's, not the concept's own (1)
    shows(page, answer)
    assert page.inner_text("#view-caption") == f"similarity {similarity:.3f} · gradcam · layer4"
    assert page.locator("#concept-photo").is_visible()

    with page.expect_response(is_explain) as answered:
        page.click("#grid-button")
    options, images = sent(bodies, answered.value)
    assert images == 2 and "targets" not in options and options["similarToImage"] == 2
    page.wait_for_selector("#grid figure.cell")
    assert page.locator("#grid figure.cell").count() == 1
    assert "similarity" in page.locator("#grid .head").all_inner_texts()
    assert f"similarity {similarity:.3f}" in page.inner_text("#grid figure.cell figcaption")
    save(page, "explorer-similarity.png", tmp_path)
