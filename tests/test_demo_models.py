"""The demo's Gradio-free parts: upload decoding and its messages, size limits, result tables, checkpoint
discovery, drawing at a readable size."""

from pathlib import Path

import gradio
import numpy as np
import pytest
import torch
from gradio.utils import get_type_hints
from PIL import Image

from apps.demo.handlers import DemoHandlers, upload_path
from apps.demo.models import DemoInputError, ModelCache, find_checkpoints, fit_size, read_upload
from apps.demo.views import display_copy, draw_detections
from apps.tasks.inference.detection import DetectionInference, DetectionResult
from vision import visualize
from vision.checkpoint import save_checkpoint


def write_png(path: Path, h=30, w=40) -> np.ndarray:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[5:15, 10:30] = (200, 30, 40)
    Image.fromarray(rgb).save(path)
    return rgb


def test_read_upload_good_and_bad_files(tmp_path):
    good = tmp_path / "upload" / "scene.png"
    good.parent.mkdir()
    rgb = write_png(good)
    assert np.array_equal(read_upload(good), rgb)
    assert np.array_equal(read_upload(str(good)), rgb)  # the cached decode hands out equal copies
    read_upload(good)[:] = 0
    assert np.array_equal(read_upload(good), rgb)

    text = tmp_path / "upload" / "notes.txt"
    text.write_text("hello world")
    empty = tmp_path / "upload" / "empty.png"
    empty.write_bytes(b"")
    broken = tmp_path / "upload" / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])
    cases = [(text, "notes.txt: not an image"), (empty, "empty.png: empty file"),
             (broken, "broken.png: truncated or corrupt")]
    for path, message in cases:
        with pytest.raises(DemoInputError) as info:
            read_upload(path)
        assert str(info.value).startswith(message)
        assert str(tmp_path) not in str(info.value)  # the server's folders never reach the page
    with pytest.raises(DemoInputError, match=r"scene.png: over-size image: 40x30 = 0.0 megapixels"):
        read_upload(good, max_pixels=1000)
    with pytest.raises(DemoInputError, match="No image"):
        read_upload(None)
    with pytest.raises(DemoInputError, match="gone.png: the upload is gone"):
        read_upload(tmp_path / "gone.png")


def test_upload_path_reads_gradio_file_data():
    assert upload_path({"path": "/cache/abc/x.png", "orig_name": "x.png"}) == "/cache/abc/x.png"
    assert upload_path("/a/b.png") == "/a/b.png"
    assert upload_path(None) is None and upload_path("") is None
    with pytest.raises(DemoInputError, match="data URL"):
        upload_path({"path": None, "url": "data:image/png;base64,AAAA"})


def test_fit_size_and_boxes_mapped_back():
    image = np.zeros((1000, 3200, 3), np.uint8)
    small, scale = fit_size(image, 1600)
    assert small.shape == (500, 1600, 3) and scale == 0.5
    same, one = fit_size(image[:100, :100], 1600)
    assert one == 1.0 and same.shape == (100, 100, 3)
    found = DetectionResult(np.array([[10.0, 20.0, 60.0, 80.0], [1500.0, 400.0, 1600.0, 500.0]], np.float32),
                            np.array([0.9, 0.6], np.float32), np.array([1, 2]), [1, 2], ["circle", "square"],
                            (500, 1600))
    back = found.scaled(0.5, (1000, 3200))
    assert back.boxes.tolist() == [[20.0, 40.0, 120.0, 160.0], [3000.0, 800.0, 3200.0, 1000.0]]
    assert back.image_size == (1000, 3200)


def test_detection_rows_are_xywh_best_first():
    result = DetectionResult(np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 6.0, 25.5, 16.0]], np.float32),
                             np.array([0.4, 0.95], np.float32), np.array([1, 3]), [7, 9],
                             ["circle", "triangle"], (50, 50))
    assert result.table_rows() == [["triangle", 0.95, 5.0, 6.0, 20.5, 10.0],
                                      ["circle", 0.4, 0.0, 0.0, 10.0, 10.0]]


def test_find_checkpoints_keeps_usable_ones_and_names_the_others(tmp_path):
    classes = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    good = {"format": "visiondet", "version": 1, "task": "detection", "classes": classes,
            "model": {"arch": "faster_rcnn_r18_fpn", "roi": {"nms_thresh": 0.4}}, "state_dict": {},
            "metrics": {"AP50": 0.91234, "AP": 0.7}}
    save_checkpoint(good, tmp_path / "a_good.pt")
    save_checkpoint({"weight": torch.zeros(2)}, tmp_path / "b_bare.pt")
    (tmp_path / "c_junk.pt").write_bytes(b"not a checkpoint")
    other = tmp_path / "other"
    save_checkpoint(dict(good, task="classification", model={"backbone": "resnet18"}), other / "a_good.pt")
    save_checkpoint(dict(good, task="rcnn", model={"backbone": "resnet18"}), tmp_path / "0_rcnn.pt")
    save_checkpoint(dict(good, model={"arch": "fast_rcnn_r18"}), tmp_path / "1_fast.pt")
    found, problems = find_checkpoints([tmp_path], [tmp_path / "a_good.pt", other / "a_good.pt"])
    # the given files first, in order, by folder and name (listed once although the folder has one too);
    # then detectors newest generation first, discovery order otherwise
    assert [c.label for c in found] == [f"{tmp_path.name}/a_good.pt", "other/a_good.pt", "1_fast.pt",
                                        "0_rcnn.pt"]
    assert [c.chosen for c in found] == [True, True, False, False]
    # the detection tabs offer every detector, R-CNN's task included, through the task's inference
    assert [c.is_a(DetectionInference) for c in found] == [True, False, True, True]
    first = found[0]
    assert (first.task, first.arch, first.nms_thresh) == ("detection", "faster_rcnn_r18_fpn", 0.4)
    assert first.has_anchors and not found[2].has_anchors and found[3].nms_thresh == 0.3
    assert first.summary() == "faster_rcnn_r18_fpn; val AP50 0.912, val AP 0.700"
    assert found[1].nms_thresh is None
    assert len(problems) == 2
    assert "b_bare.pt: not a visiondet checkpoint" in problems[0]
    assert "c_junk.pt" in problems[1]


def test_small_images_are_drawn_enlarged_with_boxes_scaled():
    image = np.full((160, 200, 3), 90, np.uint8)
    canvas, view = display_copy(image)
    assert canvas.shape == (512, 640, 3) and view == 3.2
    result = DetectionResult(np.array([[10.0, 20.0, 50.0, 60.0]], np.float32), np.array([0.9], np.float32),
                             np.array([2]), [2], ["square"], (160, 200))
    drawn = draw_detections(image, result)
    # The box's left edge is at x = 10 * 3.2 = 32, between y = 64 and 192, in label 2's colour.
    assert tuple(drawn[150, 32]) == visualize.color_of(2)
    assert tuple(drawn[150, 20]) == (90, 90, 90)
    # An image drawn from its half-size inference copy: boxes given in original pixels, scale 0.5.
    half = draw_detections(image[::2, ::2].copy(), result, scale=0.5)
    assert half.shape == (512, 640, 3) and tuple(half[150, 32]) == visualize.color_of(2)


def test_demo_command_refuses_bad_arguments(tmp_path, capsys):
    from apps.cli import main

    assert main(["demo", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such file or folder" in capsys.readouterr().err
    assert main(["demo", "--port", "70000"]) == 2
    assert "not a port number" in capsys.readouterr().err
    assert main(["demo", "--concurrency", "0"]) == 2


def test_every_shipped_shapes_model_says_it_knows_only_synthetic_shapes():
    from apps import WEIGHTS_DIR

    found, problems = find_checkpoints([WEIGHTS_DIR])
    shapes = [entry for entry in found if entry.path.name.endswith("_shapes.pt")]
    assert problems == [] and len(shapes) == 5
    for entry in found[: len(found) - len(shapes)]:  # the real-photo models (weights/*_real.pt), first
        assert not entry.synthetic and entry.result_note() == "", entry.label
        line = entry.expectations()
        assert "real-imagery" in line and "learned from a single photograph" in line, line
    for entry in shapes:
        assert entry.synthetic, entry.label
        line = entry.expectations()
        assert "synthetic shapes" in line and "3 classes: circle, square, triangle" in line
        assert "never seen a real photograph" in line and "/work" not in line  # no server path on the page
        assert "Synthetic-shapes model" in entry.result_note()


def test_a_model_of_real_data_is_described_by_its_data_folder_without_a_warning(tmp_path):
    classes = [{"id": 3, "name": "circle"}, {"id": 5, "name": "dog"}]
    data = {"train": {"annotations": "/srv/private/pets/train/annotations.json"}}
    ckpt = {"format": "visiondet", "version": 1, "task": "detection", "classes": classes,
            "model": {"arch": "faster_rcnn_r18_fpn"}, "state_dict": {}, "config": {"data": data}}
    save_checkpoint(ckpt, tmp_path / "pets.pt")
    save_checkpoint(dict(ckpt, config={}), tmp_path / "unnamed.pt")
    (pets, unnamed), _ = find_checkpoints([tmp_path])
    assert not pets.synthetic and pets.result_note() == ""
    assert pets.expectations() == "Trained on the dataset in pets/train; it knows 2 classes: circle, dog."
    assert unnamed.expectations().startswith("Trained on data its checkpoint does not name;")


def test_gradio_sees_the_click_event_of_the_anchor_picture(tmp_path):
    # gradio passes a click's position only to a parameter annotated gr.SelectData that it can resolve
    handlers = DemoHandlers(ModelCache([], "cpu"), max_pixels=1000, max_side=64, files_dir=tmp_path)
    assert get_type_hints(handlers.pick_position)["evt"] is gradio.SelectData
