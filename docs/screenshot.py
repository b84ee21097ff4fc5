"""Make docs/demo.png, the README's picture of the demo: the page served on the shipped weights, one example
scene run through the detection tab, captured by Debian's headless Chromium through Playwright.

    .venv/bin/python docs/screenshot.py [--out docs/demo.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    parser.add_argument("--image", type=Path, default=None,
                        help="default: weights/examples_real/scene_real_1.jpg when the detection tab "
                             "opens on a real-photo model, else weights/examples/scene_4.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from apps.demo.page import EXAMPLES_DIR, REAL_EXAMPLES_DIR, Demo
    from apps.tasks.inference.detection import DetectionInference

    demo = Demo.from_weights()
    detectors = demo.cache.labels(DetectionInference)
    real_default = bool(detectors) and not demo.cache.checkpoint(detectors[0]).synthetic
    default_image = REAL_EXAMPLES_DIR / "scene_real_1.jpg" if real_default else EXAMPLES_DIR / "scene_4.png"
    url = demo.start("127.0.0.1", None)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            image = args.image or default_image
            page.locator("#det-input input[type=file]").set_input_files(image)
            page.click("#det-run")
            page.get_by_text("inference").first.wait_for(timeout=60_000)
            page.wait_for_timeout(500)  # let the annotated picture finish drawing
            page.evaluate("window.scrollTo(0, 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
