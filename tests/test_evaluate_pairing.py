"""`visiondet evaluate` refuses images and annotations that do not belong together before running a model,
summarises the warnings of reading the data instead of one per image, keeps its output out of weights/, and
scores predict's own output without extra flags (predict -> evaluate round trip)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
from torch.utils.data import Dataset

from apps import WEIGHTS_DIR
from apps.cli import main
from apps.engine.loader import DataWarnings, eval_loader
from apps.evaluate import default_out
from vision.data.synthetic import make_shapes

DETECTOR = WEIGHTS_DIR / "faster_rcnn_shapes.pt"  # trained on these shapes: its AP says whether ids match


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two shapes sets with the same file names and classes (seeds 0 and 1) and different image sizes."""
    root = tmp_path_factory.mktemp("sets")
    return [make_shapes("detection", root / f"s{seed}", num_images=6, seed=seed, image_size=(128, 160),
                        val_fraction=0.5) for seed in (0, 1)]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_annotations_of_another_set_are_one_error_line_before_any_model_runs(sets, capsys, tmp_path):
    images, other = sets[0]["val"] / "images", sets[1]["val"] / "annotations.json"
    not_a_model = tmp_path / "never_loaded.pt"
    not_a_model.write_bytes(b"the check comes first")
    code, out, err = run(capsys, "evaluate", "--weights", not_a_model, "--images", images,
                         "--annotations", other, "--out", tmp_path / "m.json")
    assert code == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"error: 3 of the 3 images in {images} differ in size from {other} "
                           "(the first: 000003.png (file ")
    assert "--allow-size-mismatch" in line and "visiondet data check" in line
    assert not (tmp_path / "m.json").exists()


def test_accepted_knowingly_the_size_warnings_come_as_one_summary(sets, capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "--weights", DETECTOR, "--images", sets[0]["val"] / "images",
                       "--annotations", sets[1]["val"] / "annotations.json", "--allow-size-mismatch",
                       "--workers", "2", "--batch-size", "2", "--out", tmp_path / "m.json")
    assert code == 0
    clipped = [line for line in err.splitlines() if "boxes are clipped" in line]
    assert len(clipped) == 1 and clipped[0].startswith("warning: 3 warnings like this one while reading")
    assert "return dataset[index]" not in err and json.loads((tmp_path / "m.json").read_text())["metrics"]


class Warns(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        warnings.warn(f"/data/{i:03d}.png: image is {i}x{i} but the JSON says 9x9", stacklevel=2)
        return i


def test_the_loader_summarises_its_workers_warnings_per_kind():
    summary = DataWarnings()
    batches = list(eval_loader(Warns(), lambda items: items, batch_size=2, workers=2, data_warnings=summary))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert summary.lines() == ["5 warnings like this one while reading the data: /data/000.png: image is 0x0 "
                               "but the JSON says 9x9"] and summary.lines() == []
    with warnings.catch_warnings(record=True) as caught:  # a loader without a summary warns once per pass
        warnings.simplefilter("always")
        list(eval_loader(Warns(), lambda items: items, batch_size=2, workers=0))
    assert [str(w.message)[:10] for w in caught] == ["5 warnings"]


def test_evaluate_writes_beside_a_runs_weights_and_never_into_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = WEIGHTS_DIR / "faster_rcnn_shapes.pt"
    assert default_out(shipped) == Path("runs/evaluate/faster_rcnn_shapes_eval.json")
    run_dir = tmp_path / "runs" / "detection" / "exp1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("task: detection\n")
    assert default_out(run_dir / "best.pt") == run_dir / "best_eval.json"
    assert default_out(tmp_path / "downloads" / "x.pt") == Path("runs/evaluate/x_eval.json")


def test_predict_then_evaluate_without_extra_flags(sets, capsys, tmp_path):
    val = sets[0]["val"]
    annotations = val / "annotations.json"
    code, _, err = run(capsys, "predict", "--weights", DETECTOR, "--source", val / "images", "--output",
                       tmp_path / "p", "--workers", "0", "--no-progress")
    assert code == 0 and f"image ids from {annotations.resolve()}" in err
    gt = json.loads(annotations.read_text())
    assert {r["image_id"] for r in json.loads((tmp_path / "p" / "predictions.json").read_text())} <= {
        im["id"] for im in gt["images"]}
    code, out, err = run(capsys, "evaluate", "--predictions", tmp_path / "p" / "predictions.json",
                         "--annotations", annotations, "--out", tmp_path / "m1.json")
    assert code == 0 and "matched" not in err
    ap50 = json.loads((tmp_path / "m1.json").read_text())["metrics"]["AP50"]
    assert ap50 > 0.5  # the shipped detector on its own kind of shapes: ids pair the right images

    # images copied away from their annotations.json (ids from file names), one of them unreadable, and CSV
    copied = tmp_path / "copied"
    shutil.copytree(val / "images", copied)
    (copied / "0-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # sorts first: ids from positions 1..4
    code, _, err = run(capsys, "predict", "--weights", DETECTOR, "--source", copied, "--output",
                       tmp_path / "q", "--workers", "0", "--no-progress", "--format", "csv")
    assert code == 0 and "image ids from" not in err
    assert "could not read 0-broken.png (" in err  # the failed file by name, not only a count
    assert (tmp_path / "q" / "predictions.csv").is_file() and (tmp_path / "q" / "predictions.json").is_file()
    ids = {r["image_id"] for r in json.loads((tmp_path / "q" / "predictions.json").read_text())}
    assert ids <= {2, 3, 4} and 4 in ids  # 000003.png is 2 here, 1 in the JSON: ids overlap, wrongly paired
    code, out, err = run(capsys, "evaluate", "--predictions", tmp_path / "q" / "predictions.json",
                         "--annotations", annotations, "--out", tmp_path / "m2.json")
    assert code == 0 and "matched them by file name through" in err
    assert json.loads((tmp_path / "m2.json").read_text())["metrics"]["AP50"] == ap50

    # without predict's journal the ids cannot be matched: the error says what to do
    (tmp_path / "q" / "predictions.jsonl").unlink()
    code, _, err = run(capsys, "evaluate", "--predictions", tmp_path / "q" / "predictions.json",
                       "--annotations", annotations)
    assert code == 2 and f"predict again with --coco-ids {annotations}" in err
