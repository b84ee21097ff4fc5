"""`visiondet synth` and `visiondet data check|convert|preview` through the real command line parser."""

import json

import numpy as np
import pytest
from PIL import Image

from apps.cli import main


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "shapes"
    assert main(["synth", "--task", "detection", "--out", str(out), "--num-images", "12", "--seed", "0"]) == 0
    return out / "train"


def _check(capsys, annotations, images, *extra):
    code = main(["data", "check", "--annotations", str(annotations), "--images", str(images), "--json",
                 *extra])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip().startswith("{") else None)


def test_synth_writes_both_splits(shapes):
    data = json.loads((shapes / "annotations.json").read_text())
    assert len(data["images"]) == 10
    assert len(json.loads((shapes.parent / "val" / "annotations.json").read_text())["images"]) == 2


def test_check_clean_dataset_exits_zero(shapes, capsys):
    code, report = _check(capsys, shapes / "annotations.json", shapes / "images")
    assert code == 0 and report["ok"] is True
    assert report["num_images"] == 10
    assert [c["name"] for c in report["categories"]] == ["circle", "square", "triangle"]
    assert sum(c["instances"] for c in report["categories"]) == report["num_annotations"]
    notes = {f["code"] for f in report["findings"]}
    assert "no_annotations" in notes  # the synthetic negative
    text_code = main(["data", "check", "--annotations", str(shapes / "annotations.json"), "--images",
                      str(shapes / "images")])
    text = capsys.readouterr().out
    assert text_code == 0 and "Result: OK" in text and "circle" in text


def test_check_finds_every_kind_of_problem(shapes, tmp_path, capsys):
    data = json.loads((shapes / "annotations.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for img in data["images"]:
        (images / img["file_name"]).write_bytes((shapes / "images" / img["file_name"]).read_bytes())
    first, second = data["images"][0], data["images"][1]
    (images / first["file_name"]).write_bytes((images / first["file_name"]).read_bytes()[:200])  # truncated
    (images / second["file_name"]).unlink()  # missing
    data["images"][2]["width"] += 5  # size mismatch
    data["images"].append({"id": 50, "file_name": "../../etc/passwd", "width": 4, "height": 4})
    data["images"].append(dict(data["images"][3]))  # duplicate id
    ann = data["annotations"][0]
    img = next(i for i in data["images"] if i["id"] == ann["image_id"])
    data["annotations"] += [
        {**ann, "id": 900, "category_id": 42},
        {**ann, "id": 901, "image_id": 777},
        {**ann, "id": 902, "bbox": [5, 5, 0.4, 10]},
        {**ann, "id": 903, "bbox": [-20, 0, 30, 10]},
        {**ann, "id": 904, "bbox": [img["width"] + 5, 5, 20, 20]},  # 20x20, past the border
        {**ann, "id": 905, "bbox": [5, 5, -3, 10]},
        {**ann, "id": ann["id"]},
    ]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "stray.png")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code, report = _check(capsys, bad, images)
    assert code == 1 and report["ok"] is False
    by_code = {f["code"]: f for f in report["findings"]}
    errors = {c for c, f in by_code.items() if f["severity"] == "error"}
    assert errors == {"unreadable_image", "missing_image", "size_mismatch", "unsafe_file_name",
                      "duplicate_image_id", "unknown_category", "unknown_image", "degenerate_box",
                      "duplicate_annotation_id", "box_outside_image", "negative_box_size"}
    assert by_code["degenerate_box"]["examples"][0].startswith("902 ")  # 0.4 px wide: the only one
    assert by_code["box_outside_image"]["examples"][0].startswith("904 ")
    assert by_code["box_outside_image"]["examples"][0].endswith(f"in {img['width']}x{img['height']}")
    assert by_code["negative_box_size"]["examples"][0].endswith(": -3 x 10")
    assert by_code["unknown_category"]["examples"] == ["900 (category 42)"]
    assert by_code["unknown_image"]["examples"] == ["901"]
    assert by_code["box_out_of_bounds"]["severity"] == "warning"
    assert by_code["missing_image"]["examples"] == [f"{second['file_name']} (no such file)"]
    assert by_code["unreadable_image"]["examples"][0].startswith(first["file_name"])
    assert by_code["unlisted_image"]["examples"] == ["stray.png"]


def test_check_headers_only_misses_truncation_but_not_missing_files(shapes, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    data = json.loads((shapes / "annotations.json").read_text())
    for img in data["images"]:
        (images / img["file_name"]).write_bytes((shapes / "images" / img["file_name"]).read_bytes())
    name = data["images"][0]["file_name"]
    (images / name).write_bytes((images / name).read_bytes()[:300])
    code, _ = _check(capsys, shapes / "annotations.json", images)
    assert code == 1
    code, _ = _check(capsys, shapes / "annotations.json", images, "--headers-only")
    assert code == 0


def test_check_unreadable_json_exits_two(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{not json")
    code = main(["data", "check", "--annotations", str(tmp_path / "a.json"), "--images", str(tmp_path)])
    assert code == 2 and "a.json: not valid JSON" in capsys.readouterr().err


def test_convert_cli_round_trip_voc(tmp_path, capsys):
    xml = ("<annotation><filename>x.jpg</filename><size><width>20</width><height>10</height></size>"
           "<object><name>car</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin>"
           "<xmax>12</xmax><ymax>9</ymax></bndbox></object></annotation>")
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "x.xml").write_text(xml)
    assert main(["data", "convert", "--from", "voc", "--annotations", str(tmp_path / "voc"),
                 "--out", str(tmp_path / "x.json")]) == 0
    assert "1 images, 1 annotations, 1 categories" in capsys.readouterr().out
    assert json.loads((tmp_path / "x.json").read_text())["annotations"][0]["bbox"] == [1, 2, 11, 7]
    assert main(["data", "convert", "--from", "coco", "--to", "voc", "--annotations",
                 str(tmp_path / "x.json"), "--out", str(tmp_path / "back")]) == 0
    assert "<xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>9</ymax>" in "".join(
        (tmp_path / "back" / "x.xml").read_text().split())
    assert main(["data", "convert", "--from", "yolo", "--out", str(tmp_path / "y.json")]) == 2
    assert "needs --images, --labels, --names" in capsys.readouterr().err


def test_preview_writes_a_grid(shapes, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", "--annotations", str(shapes / "annotations.json"), "--images",
                 str(shapes / "images"), "--out", str(out), "--num", "6", "--size", "128"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 256, 4 * 256, 3)  # 6 samples in rows of 4
    assert grid[256:, 512:].max() == 40  # the two unused cells stay background
    assert "wrote" in capsys.readouterr().out


def test_preview_classification_folder(tmp_path):
    assert main(["synth", "--task", "classification", "--out", str(tmp_path / "c"), "--num-images", "6"]) == 0
    out = tmp_path / "c.png"
    root = tmp_path / "c" / "train"
    assert main(["data", "preview", "--root", str(root), "--out", str(out), "--num", "4"]) == 0
    assert np.asarray(Image.open(out)).shape == (256, 4 * 256, 3)


def test_check_class_folders_and_index_masks(tmp_path, capsys):
    """The folder layouts of classification and segmentation; one dataset per call."""
    root = tmp_path / "cls"
    assert main(["synth", "--task", "classification", "--out", str(root), "--num-images", "12"]) == 0
    capsys.readouterr()
    assert main(["data", "check", "--root", str(root / "train"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [c["name"] for c in report["categories"]] == ["circle", "square", "triangle"]
    assert sum(c["images"] for c in report["categories"]) == report["num_images"] > 0

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for stem, value in (("a", 1), ("b", 2)):
        Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(images / f"{stem}.png")
        Image.fromarray(np.full((16, 20), value, np.uint8)).save(masks / f"{stem}.png")
    args = ["data", "check", "--images", str(images), "--masks", str(masks), "--json"]
    assert main([*args, "--classes", "cat,dog"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["instances"]) for c in report["categories"]] == [
        ("background", 0), ("cat", 320), ("dog", 320), ("ignore", 0)]
    assert main([*args, "--classes", "cat"]) == 1  # label 2 has no name: training would refuse it
    assert json.loads(capsys.readouterr().out)["findings"][0]["code"] == "bad_mask_value"
    assert main(["data", "check", "--root", str(root / "train"), "--masks", str(masks)]) == 2
    assert "one dataset" in capsys.readouterr().err
