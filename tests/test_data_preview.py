"""`data preview` draws with the same drawing module as predict and the demo: one colour per class."""

import numpy as np
import torch

from apps.tasks.inference.detection import DetectionResult
from apps.tasks.inference.segmentation import SegmentationResult
from vision.data.preview import render_sample
from vision.visualize import color_of

CLASSES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


def grey(h=100, w=120, value=0.4):
    return torch.full((3, h, w), value)


def test_a_class_has_the_same_box_colour_in_preview_and_predict():
    box = [10.0, 20.0, 60.0, 70.0]
    for label in (1, 2, 3):
        target = {"boxes": torch.tensor([box]), "labels": torch.tensor([label])}
        preview = render_sample(grey(), target, CLASSES)
        image = np.ascontiguousarray((grey().permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
        result = DetectionResult(np.array([box], np.float32), np.array([0.9], np.float32), np.array([label]),
                                 [label], [CLASSES[label - 1]["name"]], (100, 120))
        predicted = result.draw(image)
        # the left edge of the box, below its label, in the class's colour in both pictures
        assert tuple(preview[50, 10]) == tuple(predicted[50, 10]) == color_of(label)
    two = {"boxes": torch.tensor([box, [70.0, 20.0, 110.0, 70.0]]), "labels": torch.tensor([1, 2])}
    drawn = render_sample(grey(), two, CLASSES)
    assert tuple(drawn[50, 10]) == color_of(1) and tuple(drawn[50, 70]) == color_of(2)


def test_segmentation_preview_and_predict_paint_a_class_in_its_colour():
    label_map = torch.zeros(40, 50, dtype=torch.int64)
    label_map[10:30, 10:40] = 2
    preview = render_sample(grey(40, 50, 0.0), label_map, CLASSES)  # black image: colour x 0.5
    expected = np.round(np.array(color_of(2)) * 0.5)
    np.testing.assert_allclose(preview[20, 25], expected, atol=1)
    black = np.zeros((40, 50, 3), np.uint8)
    mask = label_map.numpy().astype(np.uint8)
    predicted = SegmentationResult(mask, CLASSES, (40, 50)).draw(black)
    assert tuple(predicted[10, 10]) == color_of(2)  # region outline in the full colour
    assert tuple(preview[0, 0]) == tuple(predicted[0, 0]) == (0, 0, 0)  # background undrawn in both
