"""The demo page served for real on a free localhost port with the shipped default weights, driven by a
headless Chromium (Debian's package, through Playwright) and by gradio_client, including bad uploads.

The server is built with small limits so that the limits themselves are exercised: uploads over one megapixel
are refused, and inference runs on copies at most 200 px long (the 192-256 px example scenes are
downscaled, and the boxes must come back in their own pixels).
"""

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps.demo.page import EXAMPLES_DIR, WEIGHTS_DIR, Demo
from apps.tasks.inference.detection import DetectionInference

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DETECTOR = "faster_rcnn_shapes.pt"
SCENE = EXAMPLES_DIR / "scene_1.png"
TRUTH = json.loads((EXAMPLES_DIR / "examples.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the shapes models only (links to them): these tests run them on the shapes scenes; the real-photo
    # models and their gallery have tests/test_demo_real.py
    shapes = tmp_path_factory.mktemp("weights")
    for path in WEIGHTS_DIR.glob("*_shapes.pt"):
        (shapes / path.name).symlink_to(path)
    demo = Demo.from_weights([shapes], max_pixels=1_000_000, max_side=200)
    url = demo.start("127.0.0.1", free_port())
    yield demo, url
    temp_dir = demo.temp_dir
    demo.close()
    assert not temp_dir.exists()  # uploads, results and downloads are all gone


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install-dev` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def iou(a, b) -> float:
    """Boxes as x, y, w, h."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def found_objects(rows: list[list], truth: list[dict]) -> int:
    """Ground-truth objects with a detection of their class at IoU >= 0.5 (rows: class, score, x, y, w, h)."""
    return sum(any(r[0] == obj["name"] and iou(r[2:6], obj["bbox"]) >= 0.5 for r in rows) for obj in truth)


def test_browser_upload_detect_table_and_picture(server, browser, tmp_path):
    _, url = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    # before anything runs, every tab says what its model was trained on (the shapes, not photographs)
    assert "never seen a real photograph" in page.locator("#det-model").inner_text()
    page.locator("#det-input input[type=file]").set_input_files(SCENE)
    page.click("#det-run")
    page.get_by_text("inference").first.wait_for(timeout=30_000)
    assert "Synthetic-shapes model" in page.locator("#det-info").inner_text()
    rows = page.locator("#det-table tbody tr")
    assert rows.count() >= 1
    table = page.locator("#det-table").inner_text()
    assert any(name in table for name in ("circle", "square", "triangle"))
    picture = page.locator("#det-output img")
    assert picture.is_visible() and "image.png" in (picture.get_attribute("src") or "")
    assert page.locator('#det-json a[download="scene_1_detections.json"]').is_visible()
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    page.close()


def test_gradio_client_every_task(server, tmp_path):
    from gradio_client import Client, handle_file

    demo, url = server
    client = Client(url, verbose=False, download_files=str(tmp_path))
    # The scene (over 200 px) ran at 200 px (max_side): rows and JSON are in the original image's pixels.
    picture, table, json_file, info = client.predict(handle_file(SCENE), DETECTOR, 0.5, 0.5, [],
                                                     api_name="/detect")
    rows = table["data"]
    truth = TRUTH[SCENE.name]
    assert found_objects(rows, truth) >= len(truth) - 1, (rows, truth)
    ran_at = re.search(r"ran at (\d+)×(\d+)", info)
    assert ran_at and max(map(int, ran_at.groups())) == 200 and Path(picture).is_file(), info
    record = json.loads(Path(json_file).read_text())
    assert [d["name"] for d in record["detections"]] == [r[0] for r in rows]
    assert record["width"] == Image.open(SCENE).width
    # The class filter keeps one class; the model was read from disk once for both requests.
    wanted = rows[-1][0]  # the least confident detection's class: other classes outscore it
    _, table, _, _ = client.predict(handle_file(SCENE), DETECTOR, 0.3, 0.5, [wanted], api_name="/detect")
    assert table["data"] and {r[0] for r in table["data"]} == {wanted}
    assert demo.cache.loads[DETECTOR] == 1

    top = client.predict(handle_file(EXAMPLES_DIR / "shape_circle.png"), "classifier_shapes.pt",
                         api_name="/classify")[0]
    assert top["label"] == "circle" and len(top["confidences"]) == 3
    overlay, classes, _ = client.predict(handle_file(SCENE), "deeplabv3plus_shapes.pt", api_name="/segment")
    assert {r[0] for r in classes["data"]} & {obj["name"] for obj in truth} and Path(overlay).is_file()
    *panels, text = client.predict(handle_file(SCENE), DETECTOR, 50, 50, 20, 0.5, api_name="/explain")
    assert len(panels) == 4 and all(Path(p["value"] if isinstance(p, dict) else p).is_file() for p in panels)
    assert "anchors" in text and "proposals" in text


def test_every_shipped_detector_finds_the_example_objects(server, tmp_path):
    from gradio_client import Client, handle_file

    demo, url = server
    detectors = demo.cache.labels(DetectionInference)
    assert detectors == [DETECTOR, "fast_rcnn_shapes.pt", "rcnn_shapes.pt"]  # newest generation first
    client = Client(url, verbose=False, download_files=str(tmp_path))
    for scene in (SCENE, EXAMPLES_DIR / "scene_3.png"):
        truth = TRUTH[scene.name]
        for label in detectors:
            _, table, _, _ = client.predict(handle_file(scene), label, 0.5, 0.5, [], api_name="/detect")
            assert found_objects(table["data"], truth) >= len(truth) - 1, (label, scene.name, table["data"])
    for label in detectors[1:]:  # the selective-search view
        *panels, text = client.predict(handle_file(SCENE), label, 50, 50, 20, 0.5, api_name="/explain")
        assert "selective search" in text and all(Path(p["value"] if isinstance(p, dict) else p).is_file()
                                                  for p in panels)


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, browser, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import ValidationError

    demo, url = server
    fake = tmp_path / "fake.png"
    fake.write_text("this is a text file, not a picture")
    broken = tmp_path / "broken.png"
    broken.write_bytes(SCENE.read_bytes()[:200])
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((1000, 1100, 3), np.uint8)).save(big)  # 1.1 megapixels, over the limit

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.click("#det-run")  # nothing uploaded yet
    page.get_by_text("No image: upload one").wait_for(timeout=10_000)
    page.locator("#det-input input[type=file]").set_input_files(fake)
    page.click("#det-run")
    message = page.get_by_text("fake.png: not an image")
    message.wait_for(timeout=10_000)
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and str(demo.temp_dir) not in text and "/tmp" not in text
    page.locator("#det-input input[type=file]").set_input_files(SCENE)
    page.click("#det-run")
    page.get_by_text("inference").first.wait_for(timeout=30_000)
    assert page.locator("#det-table tbody tr").count() >= 1
    page.close()

    client = Client(url, verbose=False, download_files=str(tmp_path))
    for path, expected in ((fake, "fake.png: not an image"), (broken, "broken.png: truncated or corrupt"),
                           (big, "big.png: over-size image: 1100x1000"), (None, "No image")):
        with pytest.raises(ValidationError) as info:
            client.predict(handle_file(path) if path else None, DETECTOR, 0.5, 0.5, [], api_name="/detect")
        assert expected in str(info.value) and "/tmp" not in str(info.value)
    _, table, _, _ = client.predict(handle_file(SCENE), DETECTOR, 0.5, 0.5, [], api_name="/detect")
    assert table["data"]


def test_close_removes_the_temporary_folder():
    demo = Demo([])
    (demo.temp_dir / "downloads").mkdir()
    (demo.temp_dir / "downloads" / "x.json").write_text("{}")
    demo.close()
    assert not demo.temp_dir.exists()


def _bottom(page, selector: str) -> float:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not rendered"
    return box["y"] + box["height"]


def test_first_screen_results_legend_and_stale_outputs_as_a_person_sees_them(server, browser, tmp_path):
    _, url = server
    broken = tmp_path / "broken.png"
    broken.write_bytes(SCENE.read_bytes()[:200])
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((1000, 1100, 3), np.uint8)).save(big)  # 1.1 megapixels, over the limit
    for width in (1366, 420):  # a laptop, a phone: the button and the examples without scrolling
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url)
        page.wait_for_selector("#det-examples button.gallery-item", timeout=30_000)
        assert _bottom(page, "#det-run") <= 900 and _bottom(page, "#det-examples") <= 900, width
        page.close()

    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.goto(url)
    page.wait_for_selector("#det-examples button.gallery-item[aria-label]", timeout=30_000)
    labels = page.eval_on_selector_all("button.gallery-item",
                                       "buttons => buttons.map(b => b.getAttribute('aria-label'))")
    assert "Example scene_1.png: 1 triangle, 3 squares, 1 circle" in labels
    assert all(label and label.startswith("Example ") for label in labels)
    assert page.locator("button[aria-label='Share' i], button[title='Share' i]").count() == 0

    page.locator("#det-input input[type=file]").set_input_files(SCENE)
    page.click("#det-run")
    page.locator("#det-info").get_by_text("inference").wait_for(timeout=30_000)
    # gradio fills the info, the table and the picture in separate updates: on a loaded machine the picture
    # can arrive a moment after the text, so wait for it rather than sample it once
    page.locator("#det-output img").wait_for(state="visible", timeout=10_000)
    assert page.locator("#det-table tbody tr").count() >= 1
    for bad, message in ((broken, "broken.png: truncated or corrupt"), (big, "big.png: over-size image")):
        page.locator("#det-input input[type=file]").set_input_files(bad)
        page.click("#det-run")
        page.get_by_text(message).first.wait_for(timeout=10_000)
        # the previous image's boxes, table and JSON are gone, not left as if they were this upload's
        page.wait_for_function("() => !document.querySelector('#det-output img')", timeout=10_000)
        assert page.locator("#det-table tbody tr").filter(has_text="square").count() == 0
        assert page.locator("#det-info").inner_text().strip() == ""
        assert page.locator("#det-json a[download]").count() == 0

    page.get_by_role("tab", name="Segmentation").click()
    page.locator("#seg-input input[type=file]").set_input_files(SCENE)
    page.click("#seg-run")
    page.locator("#seg-info").get_by_text("inference").wait_for(timeout=30_000)
    picture = page.locator("#seg-output img")
    box = picture.bounding_box()
    # the legend is the strip at the bottom of the picture: what is drawn there is the picture itself, not
    # Gradio's toolbar or label, on its left, middle and right
    for fx in (0.05, 0.5, 0.95):
        at = page.evaluate("([x, y]) => document.elementFromPoint(x, y).outerHTML.slice(0, 40)",
                           [box["x"] + fx * box["width"], box["y"] + box["height"] - 6])
        assert at.startswith("<img"), at
    page.close()
