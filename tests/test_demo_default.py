"""`visiondet demo --weights runs/.../best.pt`: each tab opens on the user's checkpoint, named by its run
folder and data (not a bare best.pt), with the shipped models still in the picker; checked in Chromium on a
real server, started the way the command starts it (apps.demo.run's sources)."""

import socket
from pathlib import Path

import pytest

from apps.demo.page import EXAMPLES_DIR, WEIGHTS_DIR, Demo
from apps.demo.run import DemoOptions, _sources
from apps.tasks.inference.classification import ClassificationInference
from apps.tasks.inference.detection import DetectionInference
from vision.checkpoint import load_checkpoint, save_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MINE = "exp1/best.pt · shapes_det (train)"
# the shipped real-photo models, where weights/ has them, come before the shapes ones
REAL_DETECTOR = [p.name for p in [WEIGHTS_DIR / "faster_rcnn_real.pt"] if p.is_file()]
REAL_CLASSIFIER = [p.name for p in [WEIGHTS_DIR / "classifier_real.pt"] if p.is_file()]
SHIPPED_DETECTORS = [*REAL_DETECTOR, "faster_rcnn_shapes.pt", "fast_rcnn_shapes.pt", "rcnn_shapes.pt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def users_runs(root: Path) -> list[Path]:
    """A detection run as training leaves it (best.pt naming its data) and a classifier from an older run
    (no trained_on), both copies of the shipped weights."""
    detector = load_checkpoint(WEIGHTS_DIR / "faster_rcnn_shapes.pt")
    detector["trained_on"] = "shapes_det (train)"
    classifier = load_checkpoint(WEIGHTS_DIR / "classifier_shapes.pt")
    classifier.pop("trained_on", None)
    return [save_checkpoint(detector, root / "runs" / "detection" / "exp1" / "best.pt"),
            save_checkpoint(classifier, root / "runs" / "classification" / "exp2" / "best.pt")]


def test_the_pickers_open_on_the_users_checkpoints(tmp_path):
    folders, chosen = _sources(DemoOptions(weights=[str(p) for p in users_runs(tmp_path)]))
    demo = Demo.from_weights(folders, chosen)
    try:
        detectors = demo.cache.labels(DetectionInference)
        assert detectors == [MINE, *SHIPPED_DETECTORS]
        assert demo.cache.labels(ClassificationInference) == ["exp2/best.pt", *REAL_CLASSIFIER,
                                                               "classifier_shapes.pt"]
        assert demo.cache.checkpoint(MINE).expectations().startswith("Trained on shapes_det (train);")
    finally:
        demo.close()
    # a shipped checkpoint passed with --weights becomes the default too (listed once)
    folders, chosen = _sources(DemoOptions(weights=[str(WEIGHTS_DIR / "rcnn_shapes.pt")]))
    demo = Demo.from_weights(folders, chosen)
    try:
        assert demo.cache.labels(DetectionInference) == ["weights/rcnn_shapes.pt", *REAL_DETECTOR,
                                                         "faster_rcnn_shapes.pt", "fast_rcnn_shapes.pt"]
    finally:
        demo.close()


@pytest.fixture()
def page(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install-dev` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    folders, chosen = _sources(DemoOptions(weights=[str(p) for p in users_runs(tmp_path)]))
    demo = Demo.from_weights(folders, chosen, max_side=200)
    url = demo.start("127.0.0.1", free_port())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            yield page
            browser.close()
    finally:
        demo.close()


def test_browser_detects_with_the_users_model_by_default(page):
    picker = page.get_by_label("Detector").first
    assert picker.input_value() == MINE
    assert "Trained on shapes_det (train)" in page.locator("#det-model").inner_text()
    picker.click()  # the shipped detectors are still offered
    options = page.get_by_role("option")
    options.first.wait_for(timeout=10_000)
    offered = [text.split("\n")[-1] for text in options.all_inner_texts()]  # (the picked one has a tick)
    assert offered == [MINE, *SHIPPED_DETECTORS]
    page.keyboard.press("Escape")
    page.locator("#det-input input[type=file]").set_input_files(EXAMPLES_DIR / "scene_1.png")
    page.click("#det-run")
    page.get_by_text("inference").first.wait_for(timeout=30_000)
    assert MINE in page.locator("#det-info").inner_text()  # the result says which model made it
    page.get_by_role("tab", name="Classification").click()
    assert page.get_by_label("Classifier").input_value() == "exp2/best.pt"
