import numpy as np
import pytest

from vision.visualize import (
    class_colors,
    color_of,
    colorize_mask,
    draw_detections,
    draw_legend,
    draw_topk,
    overlay_mask,
)


def gray(h=120, w=160, value=100):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_class_colors_are_stable_and_distinct():
    colors = class_colors(20)
    assert colors.shape == (20, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, class_colors(20))
    np.testing.assert_array_equal(class_colors(5), colors[:5])  # a label keeps its colour whatever K is
    assert color_of(7) == tuple(int(c) for c in colors[7])
    diff = colors[:, None, :].astype(int) - colors[None, :, :].astype(int)
    dist = np.sqrt((diff**2).sum(-1)) + np.eye(20) * 1e9
    assert dist.min() > 25  # no two of the first 20 classes look the same


def test_draw_detections_outline_in_class_colour_and_input_untouched():
    image = gray()
    before = image.copy()
    boxes = np.array([[10, 60, 50, 100], [90, 60, 150, 110]], dtype=np.float32)
    out = draw_detections(image, boxes, np.array([1, 2]), np.array([0.9, 0.4]), ["bg", "cat", "dog"],
                          line_width=1)
    np.testing.assert_array_equal(image, before)
    assert out.shape == image.shape and out.dtype == np.uint8
    # left edge of each box, below its label, is the class colour
    assert tuple(out[80, 10]) == color_of(1)
    assert tuple(out[85, 90]) == color_of(2)
    assert color_of(1) != color_of(2)
    # inside and outside the boxes nothing changes
    assert tuple(out[80, 30]) == (100, 100, 100)
    assert tuple(out[115, 60]) == (100, 100, 100)
    # the label is drawn above the first box: the strip above y=60 holds label pixels
    assert (out[40:60, 10:40] != 100).any()


def test_draw_detections_clips_boxes_and_handles_empty():
    image = gray()
    out = draw_detections(image, np.array([[-20, -20, 500, 500]]), np.array([3]), line_width=2)
    assert tuple(out[60, 0]) == color_of(3) and tuple(out[60, 159]) == color_of(3)
    empty = draw_detections(image, np.zeros((0, 4)), np.zeros((0,), dtype=np.int64), np.zeros((0,)))
    np.testing.assert_array_equal(empty, image)


def test_draw_detections_rejects_bad_input():
    with pytest.raises(ValueError, match="must match"):
        draw_detections(gray(), np.zeros((2, 4)), np.array([1]))
    with pytest.raises(ValueError, match="has no name"):
        draw_detections(gray(), np.zeros((1, 4)), np.array([5]), names=["bg", "a"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        draw_detections(np.zeros((4, 4), np.float32), np.zeros((0, 4)), np.zeros(0))


def test_colorize_mask_hand_computed():
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    colors = class_colors(3)
    out = colorize_mask(mask)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], colors[1])
    np.testing.assert_array_equal(out[1, 0], colors[2])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 0])


def test_overlay_mask_blends_only_class_pixels():
    image = gray(40, 40, 100)
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 10:20] = 2
    mask[30:, 30:] = 255
    out = overlay_mask(image, mask, alpha=0.5, legend=False)
    expected = np.round(0.5 * 100 + 0.5 * class_colors(3)[2].astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(out[15, 15], expected)
    np.testing.assert_array_equal(out[5, 5], [100, 100, 100])  # background
    np.testing.assert_array_equal(out[35, 35], [100, 100, 100])  # ignore
    with pytest.raises(ValueError, match="does not match"):
        overlay_mask(image, mask[:10])


def test_overlay_outlines_each_region_in_its_full_colour():
    image = gray(40, 40, 100)
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 10:20] = 1
    mask[20:30, 10:20] = 2  # touching regions keep their own edges
    out = overlay_mask(image, mask, legend=False)
    colors = class_colors(3)
    np.testing.assert_array_equal(out[10, 15], colors[1])  # top edge of region 1: unblended
    np.testing.assert_array_equal(out[29, 15], colors[2])  # bottom edge of region 2
    np.testing.assert_array_equal(out[20, 15], colors[2])  # the shared border belongs to both
    assert not (out[15, 15] == colors[1]).all()  # inside: blended, the image shows through


def test_legend_goes_in_a_strip_below_the_picture():
    image = gray(100, 200)
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[60:, :50] = 1
    out = overlay_mask(image, mask, ["background", "road", "sky"])
    assert out.shape[0] > 100 and out.shape[1] == 200
    np.testing.assert_array_equal(out[:60, 50:], image[:60, 50:])  # nothing drawn over the picture
    strip = out[100:]
    assert (strip == 255).all(-1).mean() > 0.8  # white
    assert (strip == np.array(color_of(1), dtype=np.uint8)).all(-1).any()  # the road swatch
    assert not (strip == np.array(color_of(2), dtype=np.uint8)).all(-1).any()  # sky is absent
    np.testing.assert_array_equal(draw_legend(image, []), image)
    titled = draw_legend(image, [], title="1 · proposals")
    assert titled.shape[0] > 100 and (titled[100:] < 100).all(-1).any()  # the title's dark text


def test_draw_topk_panel():
    image = gray(100, 200)
    out = draw_topk(image, [("cat", 0.8), ("dog", 0.15)])
    assert tuple(out[1, 1]) == (0, 0, 0)  # panel background
    assert (out[:40, :100] > 200).all(-1).any()  # the top-1 text in white
    np.testing.assert_array_equal(out[90:, 150:], image[90:, 150:])
