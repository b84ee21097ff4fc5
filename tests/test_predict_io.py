import csv
import json
from pathlib import Path

import pytest

from apps.predict.run import image_ids
from apps.predict.sources import find_images
from apps.predict.writers import (
    JsonlWriter,
    OutputError,
    check_output_location,
    count_outputs,
    done_names,
    merge_shards,
    prepare_output,
    read_jsonl,
    repair_jsonl,
    write_coco_results,
    write_csv,
)
from apps.tasks.inference.classification import ClassificationResult
from apps.tasks.inference.detection import DetectionResult
from apps.tasks.inference.segmentation import SegmentationResult

RUN = {"weights": "/w.pt", "task": "detection", "sources": ["/data"], "score_threshold": 0.5,
       "nms_threshold": None, "classes": None, "top_k": 5, "max_pixels": 100}


def det_record(name, image_id, *boxes):
    return {"file": name, "image_id": image_id, "width": 50, "height": 40,
            "detections": [{"bbox": list(b), "score": 0.9, "category_id": 7, "name": "cat"} for b in boxes]}


def test_output_location_rules(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    check_output_location(tmp_path / "out", [src], allow_inside_source=False)
    with pytest.raises(OutputError, match="inside the source folder .*--allow-inside-source"):
        check_output_location(src / "out", [src], allow_inside_source=False)
    check_output_location(src / "out", [src], allow_inside_source=True)
    with pytest.raises(OutputError, match="would hold the source folder"):
        check_output_location(src, [src], allow_inside_source=True)
    with pytest.raises(OutputError, match="would hold the source folder"):
        check_output_location(tmp_path, [src], allow_inside_source=True)


def test_existing_outputs_need_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    prepare_output(out, RUN, resume=False, overwrite=False)
    assert json.loads((out / "run.json").read_text())["weights"] == "/w.pt"
    (out / "predictions.jsonl").write_text(json.dumps(det_record("a.jpg", 1)) + "\n")
    (out / "masks").mkdir()
    with pytest.raises(OutputError, match="already holds predictions .*--resume .*--overwrite"):
        prepare_output(out, RUN, resume=False, overwrite=False)
    with pytest.raises(OutputError, match="score_threshold: 0.5 then, 0.3 now"):
        prepare_output(out, {**RUN, "score_threshold": 0.3}, resume=True, overwrite=False)
    prepare_output(out, RUN, resume=True, overwrite=False)
    assert done_names(out) == {"a.jpg"}
    (out / "notes.txt").write_text("mine")
    prepare_output(out, {**RUN, "score_threshold": 0.3}, resume=False, overwrite=True)
    assert not (out / "predictions.jsonl").exists() and not (out / "masks").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only our own files are deleted


def test_a_folder_we_did_not_write_is_never_wiped(tmp_path):
    out = tmp_path / "theirs"
    (out / "images").mkdir(parents=True)
    with pytest.raises(OutputError, match="not written by visiondet predict"):
        prepare_output(out, RUN, resume=False, overwrite=True)
    assert (out / "images").is_dir()


def test_torn_last_line_is_cut_and_writing_continues(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"file": "a"}\n{"file": "b"}\n{"file": "c", "detec')
    assert [r["file"] for r in read_jsonl(path)] == ["a", "b"]
    with JsonlWriter(path) as w:
        w.write({"file": "c"})
    assert path.read_text() == '{"file": "a"}\n{"file": "b"}\n{"file": "c"}\n'
    path.write_text('{"file": "only half')
    repair_jsonl(path)
    assert path.read_text() == ""


def test_merge_shards_in_rank_order_once_each(tmp_path):
    out = tmp_path / "out"
    (out / ".shards").mkdir(parents=True)
    (out / "predictions.jsonl").write_text(json.dumps(det_record("a.jpg", 1)) + "\n")
    for rank, names in [(1, ["d.jpg", "e.jpg"]), (0, ["b.jpg", "a.jpg", "c.jpg"]), (10, ["f.jpg"])]:
        with JsonlWriter(out / ".shards" / f"predictions.rank{rank}.jsonl") as w:
            for name in names:
                w.write(det_record(name, 1))
    (out / ".shards" / "errors.rank1.jsonl").write_text('{"file": "x.jpg", "reason": "empty"}\n')
    assert done_names(out) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"}
    merge_shards(out)
    assert [r["file"] for r in read_jsonl(out / "predictions.jsonl")] == [
        "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    assert [r["file"] for r in read_jsonl(out / "errors.jsonl")] == ["x.jpg"]
    assert not (out / ".shards").exists()


def test_coco_results_load_in_pycocotools_and_csv(tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    out.mkdir()
    with JsonlWriter(out / "predictions.jsonl") as w:
        w.write(det_record("a.jpg", 397133, (1.5, 2.0, 10.0, 20.0), (5, 5, 4, 4)))
        w.write(det_record("b.jpg", 42))  # no detections: no results line, still a csv row
        w.write(det_record("c.jpg", None, (0, 0, 1, 1)))  # unknown id: left out
    assert write_coco_results(out) == (2, 1)
    results = json.loads((out / "predictions.json").read_text())
    assert results[0] == {"image_id": 397133, "category_id": 7, "bbox": [1.5, 2.0, 10.0, 20.0], "score": 0.9}
    gt = COCO()
    images = [{"id": 397133, "width": 50, "height": 40}, {"id": 42, "width": 50, "height": 40}]
    gt.dataset = {"images": images, "annotations": [], "categories": [{"id": 7, "name": "cat"}]}
    gt.createIndex()
    dt = gt.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds(imgIds=[397133])) == 2
    assert dt.loadAnns(dt.getAnnIds())[0]["area"] == pytest.approx(200.0)
    write_csv(out, DetectionResult)
    rows = list(csv.reader(open(out / "predictions.csv", encoding="utf-8")))
    assert rows[0][:5] == ["file", "image_id", "width", "height", "category_id"]
    assert rows[1] == ["a.jpg", "397133", "50", "40", "7", "cat", "0.9", "1.5", "2.0", "10.0", "20.0"]
    assert rows[3][:4] == ["b.jpg", "42", "50", "40"] and rows[3][4:] == [""] * 7
    assert len(rows) == 5
    counts = count_outputs(out, DetectionResult)
    assert counts == {"done": 3, "failed": 0, "detections_per_class": {"cat": 3}}


def test_image_ids_from_coco_json_numbers_or_order(tmp_path):
    for name in ["000000000139.jpg", "sub/000000397133.jpg", "z.jpg"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    files = find_images([tmp_path / "in"]).files
    assert image_ids(files, None) == {"000000000139.jpg": 1, "sub/000000397133.jpg": 2, "z.jpg": 3}
    assert image_ids(files[:2], None) == {"000000000139.jpg": 139, "sub/000000397133.jpg": 397133}
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [{"id": 5, "file_name": "000000397133.jpg"},
                                           {"id": 6, "file_name": "z.jpg"}], "annotations": []}))
    assert image_ids(files, str(coco)) == {"000000000139.jpg": None, "sub/000000397133.jpg": 5, "z.jpg": 6}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(OutputError, match="bad.json: not a COCO JSON"):
        image_ids(files, str(bad))


def test_counts_for_classification_and_segmentation(tmp_path):
    out = Path(tmp_path)
    with JsonlWriter(out / "predictions.jsonl") as w:
        w.write({"file": "a", "topk": [{"name": "cat"}, {"name": "dog"}]})
        w.write({"file": "b", "topk": [{"name": "cat"}]})
    with JsonlWriter(out / "errors.jsonl") as w:
        w.write({"file": "c", "reason": "empty"})
    assert count_outputs(out, ClassificationResult) == {"done": 2, "failed": 1, "top1_per_class": {"cat": 2}}
    (out / "predictions.jsonl").write_text(json.dumps({"file": "a", "classes": [{"name": "road"}]}) + "\n")
    assert count_outputs(out, SegmentationResult)["images_per_class"] == {"road": 1}
