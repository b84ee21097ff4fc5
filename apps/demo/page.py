"""The Gradio page of ``visiondet demo``: detection, segmentation, classification and "how it works" tabs.

    demo = Demo.from_weights(["weights"], extra=["runs/detection/exp1/best.pt"])
    url = demo.start(port=0)          # background server on 127.0.0.1, as the tests use it
    demo.close()                      # stops it and deletes every temporary file it made

The page is a thin layer: apps.demo.handlers runs the models (through apps.predict.predictor.Predictor and
detection.explain), apps.demo.views draws. Every model runs through one queue with a concurrency limit (two
CPU-bound requests at once would only share the same cores); models are loaded once, on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apps import WEIGHTS_DIR
from apps.demo.handlers import DemoHandlers
from apps.demo.models import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    TABLE_HEADERS,
    Checkpoint,
    ModelCache,
    find_checkpoints,
)
from apps.tasks.inference.base import DEFAULT_SCORE_THRESH, Inference
from apps.tasks.inference.classification import ClassificationInference
from apps.tasks.inference.detection import DetectionInference
from apps.tasks.inference.segmentation import SegmentationInference

__all__ = ["Demo", "WEIGHTS_DIR", "EXAMPLES_DIR", "REAL_EXAMPLES_DIR", "gallery_order", "real_examples"]

EXAMPLES_DIR = WEIGHTS_DIR / "examples"
# photographs for the real-photo models (weights/pick_real_examples.py), apart from the shapes examples:
# `--int8 weights/examples` calibrates the shapes detector on what it was trained for
REAL_EXAMPLES_DIR = WEIGHTS_DIR / "examples_real"
# Gradio deletes its temporary files (uploads, results) every 10 minutes once they are 30 minutes old, and
# everything when the server stops; the whole folder is ours and removed by close().
DELETE_CACHE = (600, 1800)
# No "share" button: it only works on Hugging Face Spaces and answers "Must be on Spaces to share" elsewhere.
OUTPUT_BUTTONS = ["download", "fullscreen"]
MAX_FILE_SIZE = "25mb"  # uploads over this are refused by the server before any decoding
QUEUE_SIZE = 32


def _image_input(**kwargs: Any) -> Any:
    """An image upload. Events that read it run with ``preprocess=False``: the handler receives the upload as
    Gradio stored it (checked to be in its cache, never opened), and our decoder
    (vision.data.images.read_image) says what is wrong with a bad file instead of a Pillow traceback."""
    import gradio as gr

    return gr.Image(type="filepath", **kwargs)


# Run once in the browser: names each example button after its file, and again as tabs render theirs.
_LABEL_EXAMPLES_JS = """() => {
    const names = NAMES;
    const label = () => {
        for (const img of document.querySelectorAll('button.gallery-item img')) {
            const text = names[decodeURIComponent(img.src.split('/').pop())];
            if (text && img.alt !== text) {
                img.alt = text;
                img.closest('button').setAttribute('aria-label', text);
            }
        }
    };
    label();
    new MutationObserver(label).observe(document.body, {childList: true, subtree: true});
}"""


def _examples_json(folder: Path) -> dict[str, Any]:
    truth = folder / "examples.json"
    return json.loads(truth.read_text()) if truth.is_file() else {}


def real_examples(tab: str, folder: Path = REAL_EXAMPLES_DIR) -> list[Path]:
    """The real-photo examples of ``tab`` ("classification", or "scenes": detection, segmentation and how it
    works), in the order their examples.json lists them."""
    return [folder / name for name, entry in _examples_json(folder).items()
            if entry.get("tab") in (tab, "both") and (folder / name).is_file()]


def _example_description(path: Path) -> str:
    """The gallery's name of an example: a real photograph's caption ("Example photograph: a cat, ...");
    "Example scene_1.png: 2 squares, 1 triangle" from the shipped ground truth; else the file name."""
    entry = _examples_json(path.parent).get(path.name, [])
    if isinstance(entry, dict):  # examples_real: what is in the picture, and where it comes from
        return str(entry.get("caption") or f"Example {path.name}")
    counts = Counter(obj["name"] for obj in entry)
    if not counts:
        shape = path.stem.removeprefix("shape_")
        return f"Example {path.name}" + (f": one {shape}" if shape != path.stem else "")
    return f"Example {path.name}: " + ", ".join(f"{n} {name}{'s' * (n != 1)}" for name, n in counts.items())


def gallery_order(default: Checkpoint | None, shapes: Sequence[str], photos: Sequence[str]
                  ) -> tuple[Sequence[str], Sequence[str], str]:
    """(the examples a tab shows, those it folds away, the fold's title): photographs unless the tab's
    ``default`` model is a synthetic-shapes one; one kind alone when the other has none."""
    if default is not None and default.synthetic:
        main, other, title = shapes, photos, "Photographs (for the real-photo models)"
    else:
        main, other, title = photos, shapes, "Synthetic shapes (for the shapes models)"
    return (main, other, title) if main else (other, [], title)


class Demo:
    """The demo server around a :class:`ModelCache`.

    Args:
        checkpoints: what the model pickers offer (see ``apps.demo.models.find_checkpoints``).
        problems: lines about files that are not usable checkpoints, shown at the top of the page.
        examples: bundled synthetic shapes scenes (one-click runs of the detection, segmentation and explain
            tabs).
        shape_examples: bundled single-shape images for the classification tab.
        photo_scenes, photo_crops: the same for the real-photo models: photographs and composited scenes
            (detection, segmentation, explain), photographs and crops (classification). A tab shows the
            gallery its default model knows and keeps the other one folded below it.
        device: where models run (``cpu``, ``cuda``).
        max_pixels, max_side: see ``apps.demo.handlers.DemoHandlers``.
        concurrency: model runs at the same time (the rest wait in the queue).
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], *, problems: Sequence[str] = (),
                 examples: Sequence[str | Path] = (), shape_examples: Sequence[str | Path] = (),
                 photo_scenes: Sequence[str | Path] = (), photo_crops: Sequence[str | Path] = (),
                 device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
                 concurrency: int = 1):
        self.cache = ModelCache(checkpoints, device)
        self.problems = list(problems)
        self.examples = [str(p) for p in examples]
        self.shape_examples = [str(p) for p in shape_examples]
        self.photo_scenes = [str(p) for p in photo_scenes]
        self.photo_crops = [str(p) for p in photo_crops]
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.concurrency = concurrency
        # Gradio reads GRADIO_TEMP_DIR when components are created: set it before building the page, so
        # that uploads, results and downloads all land in one folder of ours. A user's own GRADIO_TEMP_DIR
        # (another disk, a tmpfs) is honoured: ours is a fresh folder inside it, removed on close.
        self._previous_temp_dir = os.environ.get("GRADIO_TEMP_DIR")
        parent = self._previous_temp_dir or None
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="visiondet-demo-", dir=parent))
        os.environ["GRADIO_TEMP_DIR"] = str(self.temp_dir)
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.blocks = None

    @classmethod
    def from_weights(cls, folders: Sequence[str | Path] = (WEIGHTS_DIR,), extra: Sequence[str | Path] = (),
                     **kwargs: Any) -> Demo:
        """Every checkpoint in ``folders`` and ``extra``; example images from weights/examples (shapes) and
        weights/examples_real (photographs)."""
        checkpoints, problems = find_checkpoints(folders, extra)
        for line in problems:
            print(f"visiondet demo: skipped {line}", file=sys.stderr)
        kwargs.setdefault("examples", sorted(EXAMPLES_DIR.glob("scene_*.png")))
        kwargs.setdefault("shape_examples", sorted(EXAMPLES_DIR.glob("shape_*.png")))
        kwargs.setdefault("photo_scenes", real_examples("scenes"))
        kwargs.setdefault("photo_crops", real_examples("classification"))
        return cls(checkpoints, problems=problems, **kwargs)

    # ---- page ----------------------------------------------------------------------------------------------

    def build(self) -> Any:
        """The gr.Blocks page (built once)."""
        if self.blocks is not None:
            return self.blocks
        import gradio as gr

        h = DemoHandlers(self.cache, max_pixels=self.max_pixels, max_side=self.max_side,
                         files_dir=self.temp_dir / "downloads")
        run = {"concurrency_id": "models", "concurrency_limit": self.concurrency, "preprocess": False}
        with gr.Blocks(title="visiondet demo", delete_cache=DELETE_CACHE, analytics_enabled=False) as blocks:
            gr.Markdown(
                "## visiondet\nThe R-CNN family of detectors, segmentation and classification: upload an "
                "image (or paste one, or click an example) and press the button."
            )
            if not self.cache.checkpoints:
                gr.Markdown("**No checkpoints found.** Put visiondet checkpoints (`*.pt`) in `weights/` or "
                            "pass `--weights CKPT`; `weights/README.md` says how to train the default ones.")
            if self.problems:
                gr.Markdown("Skipped files: " + "; ".join(Path(p.split(":")[0]).name for p in self.problems))
            with gr.Tab("Detection", id="detection"):
                self._detection_tab(gr, h, run)
            with gr.Tab("Segmentation", id="segmentation"):
                self._segmentation_tab(gr, h, run)
            with gr.Tab("Classification", id="classification"):
                self._classification_tab(gr, h, run)
            with gr.Tab("How it works", id="explain"):
                self._explain_tab(gr, h, run)
        blocks.queue(default_concurrency_limit=self.concurrency, max_size=QUEUE_SIZE)
        self.blocks = blocks
        return blocks

    def _picker(self, gr: Any, inference_type: type[Inference], label: str) -> Any:
        """A dropdown of the checkpoints whose results are of ``inference_type`` (the tab's)."""
        choices = self.cache.labels(inference_type)
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None, label=label,
                           interactive=True)

    def _model_info(self, gr: Any, h: Any, model: Any, elem_id: str) -> Any:
        """The picked model's two lines (what it is, what it was trained on), kept in step with the picker."""
        info = gr.Markdown(h.about(model.value), elem_id=elem_id)
        model.change(h.about, [model], [info], api_visibility="private", queue=False)
        return info

    def _inputs(self, gr: Any, h: Any, inference_type: type[Inference], label: str, prefix: str, verb: str,
                alt_text: str, shapes: Sequence[str], photos: Sequence[str], *, follow_model: bool = True
                ) -> tuple[Any, ...]:
        """The top of a tab's left column: model picker and its two lines, image, button, examples (all in
        view without scrolling at 1366x900). ``follow_model=False`` leaves updating the lines to the tab.
        Returns (model, info, image, button, [example galleries])."""
        model = self._picker(gr, inference_type, label)
        if follow_model:
            info = self._model_info(gr, h, model, f"{prefix}-model")
        else:
            info = gr.Markdown(h.about(model.value), elem_id=f"{prefix}-model")
        image = _image_input(label="Image", sources=["upload", "clipboard", "webcam"], height=260,
                             elem_id=f"{prefix}-input", alt_text=alt_text)
        button = gr.Button(verb, variant="primary", elem_id=f"{prefix}-run")
        return model, info, image, button, self._galleries(gr, image, model.value, shapes, photos, prefix)

    def _galleries(self, gr: Any, image: Any, first: str | None, shapes: Sequence[str], photos: Sequence[str],
                   prefix: str) -> list[Any]:
        """The examples of the kind the tab's default model (``first``) knows, photographs unless it is a
        shapes model; the other kind folded below them, so that the first screen keeps its button and
        examples in view (on a phone too) and the shapes models keep their scenes."""
        default = self.cache.checkpoints.get(first) if first else None
        main, other, title = gallery_order(default, shapes, photos)
        galleries = [self._examples(gr, image, main, f"{prefix}-examples")]
        if other:
            with gr.Accordion(title, open=False, elem_id=f"{prefix}-more-examples"):
                galleries.append(self._examples(gr, image, other, f"{prefix}-other-examples"))
        return [g for g in galleries if g is not None]

    def _examples(self, gr: Any, image: Any, paths: Sequence[str], elem_id: str) -> Any:
        if not paths:
            return None
        return gr.Examples([[p] for p in paths], inputs=[image], label="Examples (click to run)",
                           examples_per_page=12, elem_id=elem_id)

    @staticmethod
    def _run(h: Any, button: Any, galleries: list[Any], fn: Any, inputs: list[Any], outputs: list[Any],
             api_name: str, run: dict[str, Any]) -> None:
        """``fn`` on the button (the public API ``api_name``) and on a click on an example. Each run first
        clears the outputs, so a failed run (a bad upload, say) never leaves the previous image's results on
        the page as if they were this one's."""
        def clear() -> list[None]:
            return [None] * len(outputs)

        triggers = [(button.click, {"api_name": api_name})]
        for examples in galleries:
            triggers.append((examples.load_input_event.then, {"api_visibility": "undocumented"}))
        for trigger, api in triggers:
            trigger(clear, None, outputs, queue=False, api_visibility="private").then(
                fn, inputs, outputs, validator=h.check_image, **api, **run)

    def _detection_tab(self, gr: Any, h: Any, run: dict[str, Any]) -> None:
        # Picker, image, button and examples first, thresholds after: at 1366x900 the button and the
        # examples are in view without scrolling.
        with gr.Row():
            with gr.Column(scale=1):
                model, model_info, image, button, examples = self._inputs(
                    gr, h, DetectionInference, "Detector", "det", "Detect",
                    "The image to run the detector on", self.examples, self.photo_scenes, follow_model=False)
                first = self.cache.checkpoints.get(model.value) if model.value else None
                with gr.Accordion("Thresholds and classes", open=True):
                    # the picked detector's own threshold (calibrated after training), 0.5 without one
                    score = gr.Slider(0.0, 1.0, value=first.score_thresh if first else DEFAULT_SCORE_THRESH,
                                      step=0.01, label="Score threshold")
                    nms = gr.Slider(0.05, 1.0, value=first.nms_thresh if first and first.nms_thresh else 0.5,
                                    step=0.05, label="NMS IoU threshold (per class)")
                    classes = gr.CheckboxGroup(choices=[c["name"] for c in first.classes] if first else [],
                                               label="Only these classes (none ticked: all)")
            with gr.Column(scale=1):
                picture = gr.Image(label="Detections", format="png", interactive=False, elem_id="det-output",
                                   buttons=OUTPUT_BUTTONS, alt_text="The image with the detected boxes")
                info = gr.Markdown(elem_id="det-info")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "number", "number", "number",
                                                                      "number", "number"],
                                     interactive=False, label="Detections (pixels of the original image)",
                                     elem_id="det-table")
                download = gr.File(label="JSON", interactive=False, elem_id="det-json")
        inputs, outputs = [image, model, score, nms, classes], [picture, table, download, info]
        self._run(h, button, examples, h.detect, inputs, outputs, "detect", run)
        model.change(h.model_changed, [model], [classes, nms, score, model_info], api_visibility="private",
                     queue=False)

    def _segmentation_tab(self, gr: Any, h: Any, run: dict[str, Any]) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                model, _, image, button, examples = self._inputs(
                    gr, h, SegmentationInference, "Segmentation model", "seg", "Segment",
                    "The image to segment", self.examples, self.photo_scenes)
            with gr.Column(scale=1):
                picture = gr.Image(label="Segmentation", format="png", interactive=False,
                                   elem_id="seg-output", buttons=OUTPUT_BUTTONS,
                                   alt_text="The image with each class's pixels coloured and outlined")
                info = gr.Markdown(elem_id="seg-info")
                table = gr.Dataframe(headers=["class", "pixels", "% of image"],
                                     datatype=["str", "number", "number"], interactive=False,
                                     label="Classes", elem_id="seg-table")
        self._run(h, button, examples, h.segment, [image, model], [picture, table, info], "segment", run)

    def _classification_tab(self, gr: Any, h: Any, run: dict[str, Any]) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                model, _, image, button, examples = self._inputs(
                    gr, h, ClassificationInference, "Classifier", "cls", "Classify", "The image to classify",
                    self.shape_examples, self.photo_crops)
            with gr.Column(scale=1):
                top = gr.Label(num_top_classes=5, label="Most likely classes", elem_id="cls-output")
                info = gr.Markdown(elem_id="cls-info")
        self._run(h, button, examples, h.classify, [image, model], [top, info], "classify", run)

    def _explain_tab(self, gr: Any, h: Any, run: dict[str, Any]) -> None:
        gr.Markdown("What a two-stage detector does with one image, stage by stage.")
        with gr.Row():
            with gr.Column(scale=1):
                model = self._picker(gr, DetectionInference, "Detector")
                self._model_info(gr, h, model, "exp-model")
                image = _image_input(label="Image", sources=["upload", "clipboard"], height=260,
                                     elem_id="exp-input", alt_text="The image to explain the detector on")
                button = gr.Button("Explain", variant="primary", elem_id="exp-run")
                examples = self._galleries(gr, image, model.value, self.examples, self.photo_scenes, "exp")
            with gr.Column(scale=1):
                # only Faster R-CNN has anchors; R-CNN and Fast R-CNN start from selective search
                anchors = h.has_anchors(model.value)
                with gr.Row(visible=anchors, elem_id="exp-anchor-controls") as anchor_controls:
                    x = gr.Slider(0, 100, value=50, step=0.5, label="Anchor position x (% of width)")
                    y = gr.Slider(0, 100, value=50, step=0.5, label="Anchor position y (% of height)")
                hint = gr.Markdown("Click the first picture to look at the anchors somewhere else.",
                                   visible=anchors)
                with gr.Row():
                    top_n = gr.Slider(5, 300, value=20, step=5, label="Boxes shown per stage")
                    score = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Final score threshold")
        with gr.Row():
            panels = [gr.Image(label=f"stage {i + 1}", show_label=False, format="png", interactive=False,
                               elem_id=f"exp-{i + 1}", buttons=OUTPUT_BUTTONS,
                               alt_text=f"Stage {i + 1} of the detector, titled below the picture")
                      for i in range(4)]
        text = gr.Markdown(elem_id="exp-info")
        inputs, outputs = [image, model, x, y, top_n, score], [*panels, text]
        self._run(h, button, examples, h.explain, inputs, outputs, "explain", run)
        panels[0].select(h.pick_position, [model, image, panels[0]], [x, y], api_visibility="private",
                         queue=False).then(h.explain, inputs, outputs, validator=h.check_image,
                                           api_visibility="private", **run)
        model.change(lambda label: [gr.update(visible=h.has_anchors(label))] * 2, [model],
                     [anchor_controls, hint], api_visibility="private", queue=False)

    def _accessible_examples_js(self) -> str:
        """Gradio draws examples as buttons around an image with no text: give each an accessible name and
        alt text ("Example scene_1.png: 2 squares, a triangle") once the page, or a tab, renders them."""
        every = [*self.examples, *self.shape_examples, *self.photo_scenes, *self.photo_crops]
        names = {Path(p).name: _example_description(Path(p)) for p in every}
        return _LABEL_EXAMPLES_JS.replace("NAMES", json.dumps(names))

    # ---- server --------------------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int | None = 7860, *, share: bool = False) -> str:
        """Serve the page in the background; returns its local URL (the real port when ``port`` is None)."""
        blocks = self.build()
        _, url, share_url = blocks.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=True, show_error=False,
            max_file_size=MAX_FILE_SIZE, ssr_mode=False, quiet=True, footer_links=["api"],
            max_threads=8, theme=None, js=self._accessible_examples_js(),
        )
        if share_url:
            print(f"visiondet demo: public link {share_url}")
        return url

    def serve_forever(self) -> None:
        """Block until SIGINT (Ctrl+C) or SIGTERM (``docker stop``, ``systemctl stop``), then :meth:`close`.

        Gradio cleans up on Ctrl+C only; a service manager's SIGTERM would kill the process with every upload
        left in the temporary folder, so both signals end the wait the same way.
        """
        stop = threading.Event()
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if on_main_thread:  # signal handlers can only be installed there
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            while not stop.wait(0.2) and self.blocks is not None and self.blocks.is_running:
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def close(self) -> None:
        """Stop the server and delete every temporary file (uploads, results, downloads)."""
        if self.blocks is not None:
            self.blocks.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.temp_dir):
            if self._previous_temp_dir is None:
                os.environ.pop("GRADIO_TEMP_DIR")
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._previous_temp_dir
