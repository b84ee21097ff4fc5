"""Pascal VOC and YOLO to COCO and back, on files written here."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from vision.data.coco import CocoDetection
from vision.data.convert import (
    ConversionError,
    coco_to_voc,
    coco_to_yolo,
    read_names,
    unmatched_yolo_labels,
    voc_to_coco,
    write_json,
    yolo_to_coco,
)

VOC_XML = """<annotation>
  <folder>VOC2007</folder><filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{cls}</name><pose>Left</pose><difficult>{difficult}</difficult>
  <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def _voc(folder, name, w, h, objects):
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(
        VOC_OBJECT.format(cls=c, difficult=d, x1=a, y1=b, x2=x, y2=y) for c, d, (a, b, x, y) in objects
    )
    (folder / f"{name}.xml").write_text(VOC_XML.format(name=name, w=w, h=h, objects=body))


def _objects(xml_path):
    root = ET.parse(xml_path).getroot()
    size = tuple(int(root.findtext(f"size/{k}")) for k in ("width", "height"))
    objects = [
        (o.findtext("name"), int(o.findtext("difficult")),
         tuple(int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")))
        for o in root.iter("object")
    ]
    return root.findtext("filename"), size, objects


def test_voc_to_coco_by_hand(tmp_path):
    objects = [("dog", 0, (1, 1, 10, 20)), ("cat", 1, (50, 40, 60, 45))]
    _voc(tmp_path / "Annotations", "img1", 100, 80, objects)
    _voc(tmp_path / "Annotations", "img2", 50, 50, [])
    data = voc_to_coco(tmp_path / "Annotations")
    assert data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert data["images"] == [{"id": 1, "file_name": "img1.jpg", "width": 100, "height": 80},
                              {"id": 2, "file_name": "img2.jpg", "width": 50, "height": 50}]
    dog, cat = data["annotations"]
    # VOC pixel indices 1..10 inclusive are the first ten pixels: COCO x 0, width 10
    assert dog == {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 20], "area": 200,
                   "iscrowd": 0}
    assert cat["bbox"] == [49, 39, 11, 6] and cat["iscrowd"] == 1  # difficult: ignored, as VOC evaluates


def test_voc_round_trip_gives_the_same_xml_content(tmp_path):
    objects = [("dog", 0, (1, 1, 10, 20)), ("cat", 1, (50, 40, 60, 45)), ("dog", 0, (3, 7, 99, 80))]
    _voc(tmp_path / "src", "img1", 100, 80, objects)
    _voc(tmp_path / "src", "img2", 64, 48, [("person", 0, (5, 6, 7, 8))])
    write_json(voc_to_coco(tmp_path / "src"), tmp_path / "coco.json")
    written = coco_to_voc(tmp_path / "coco.json", tmp_path / "back")
    assert [p.name for p in written] == ["img1.xml", "img2.xml"]
    for name in ("img1", "img2"):
        assert _objects(tmp_path / "back" / f"{name}.xml") == _objects(tmp_path / "src" / f"{name}.xml")


def test_voc_split_file_class_order_and_errors(tmp_path):
    _voc(tmp_path / "A", "a", 10, 10, [("dog", 0, (1, 1, 5, 5))])
    _voc(tmp_path / "A", "b", 10, 10, [("cat", 0, (1, 1, 5, 5))])
    (tmp_path / "train.txt").write_text("b\n")
    data = voc_to_coco(tmp_path / "A", split_file=tmp_path / "train.txt", classes=["dog", "cat"])
    assert [i["file_name"] for i in data["images"]] == ["b.jpg"]
    assert data["annotations"][0]["category_id"] == 2
    with pytest.raises(ConversionError, match=r"a\.xml: object class 'dog' is not in the class list"):
        voc_to_coco(tmp_path / "A", classes=["cat"])
    (tmp_path / "A" / "c.xml").write_text("<annotation><filename>c.jpg")
    with pytest.raises(ConversionError, match=r"c\.xml: not valid XML"):
        voc_to_coco(tmp_path / "A")


def _yolo_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "images" / "b.png")  # no label file
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.1 0.1 0.6 0.1 0.6 0.6\n")
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    return tmp_path / "images", tmp_path / "labels", read_names(tmp_path / "data.yaml")


def test_yolo_to_coco_by_hand(tmp_path):
    data = yolo_to_coco(*_yolo_dataset(tmp_path))
    assert data["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]  # class 0 keeps id 0
    sizes = [(i["file_name"], i["width"], i["height"]) for i in data["images"]]
    assert sizes == [("a.png", 40, 20), ("b.png", 30, 30)]
    box, polygon = data["annotations"]
    assert box["category_id"] == 0 and box["bbox"] == pytest.approx([10, 5, 20, 10])
    assert polygon["category_id"] == 1 and polygon["bbox"] == pytest.approx([4, 2, 20, 10])
    assert polygon["segmentation"][0] == pytest.approx([4, 2, 24, 2, 24, 12])
    assert polygon["area"] == pytest.approx(100)  # right triangle 20 x 10


def test_yolo_round_trip(tmp_path):
    images, labels, names = _yolo_dataset(tmp_path)
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.25 0.3 0.1 0.2\n")
    write_json(yolo_to_coco(images, labels, names), tmp_path / "coco.json")
    assert coco_to_yolo(tmp_path / "coco.json", tmp_path / "back") == ["cat", "dog"]
    assert (tmp_path / "back" / "a.txt").read_text() == (
        "0 0.500000 0.500000 0.500000 0.500000\n1 0.250000 0.300000 0.100000 0.200000\n")
    assert (tmp_path / "back" / "b.txt").read_text() == ""  # negatives stay negatives
    assert read_names(tmp_path / "back" / "classes.txt") == ["cat", "dog"]
    again = yolo_to_coco(images, tmp_path / "back", names)
    first = json.loads((tmp_path / "coco.json").read_text())
    for a, b in zip(again["annotations"], first["annotations"], strict=True):
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)


def test_converted_yolo_trains_as_coco(tmp_path):
    images, labels, names = _yolo_dataset(tmp_path)
    write_json(yolo_to_coco(images, labels, names), tmp_path / "coco.json")
    ds = CocoDetection(images, tmp_path / "coco.json")
    assert ds.classes == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 2]  # category 0 -> label 1: never background


@pytest.mark.parametrize("line,message", [
    ("2 0.5 0.5 0.1 0.1", r"a\.txt:1: class 2 is outside 0..1"),
    ("0 0.5 0.5 0.1", r"a\.txt:1: expected 'class cx cy w h'"),
    ("zero 0.5 0.5 0.1 0.1", r"a\.txt:1: not a YOLO label line"),
    ("0 5 5 10 10", r"a\.txt:1: coordinates must be normalised"),
])
def test_bad_yolo_lines_name_file_and_line(tmp_path, line, message):
    images, labels, names = _yolo_dataset(tmp_path)
    (labels / "a.txt").write_text(line + "\n")
    with pytest.raises(ConversionError, match=message):
        yolo_to_coco(images, labels, names)


def test_read_names_formats(tmp_path):
    (tmp_path / "d.yaml").write_text("names:\n  0: person\n  1: bicycle\n")
    assert read_names(tmp_path / "d.yaml") == ["person", "bicycle"]
    (tmp_path / "c.txt").write_text("a\n\nb\n")
    assert read_names(tmp_path / "c.txt") == ["a", "b"]
    (tmp_path / "e.yaml").write_text("nc: 2\n")
    with pytest.raises(ConversionError, match="no 'names' list"):
        read_names(tmp_path / "e.yaml")


def test_yolo_label_files_without_an_image_are_reported_not_dropped(tmp_path, capsys):
    from apps.cli import main

    images, labels, _ = _yolo_dataset(tmp_path)
    (labels / "renamed.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # its image was renamed or deleted
    (labels / "sub").mkdir()
    (labels / "sub" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # same stem, but no images/sub/a.png
    (labels / "classes.txt").write_text("cat\ndog\n")  # YOLO's class list is not a label file
    assert unmatched_yolo_labels(images, labels) == [labels / "renamed.txt", labels / "sub" / "a.txt"]
    out = tmp_path / "coco.json"
    code = main(["data", "convert", "--from", "yolo", "--images", str(images), "--labels", str(labels),
                 "--names", str(tmp_path / "data.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and out.is_file()  # the matched images are converted; the exit code says not all were
    assert "2 label file(s)" in err and "renamed.txt" in err and "match no image" in err
