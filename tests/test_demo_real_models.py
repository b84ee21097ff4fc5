"""The demo and the real-photo models, without a browser: the pickers open on a model of real data before
the synthetic-shapes ones (decided by what each checkpoint says of its data, not by its file name), the line
under the picker names what it knows and which classes are single photographed things, slim.py records
those, and the real-photo gallery is what weights/pick_real_examples.py writes.

The checkpoints are copies of the shipped shapes weights given the real models' data name and classes, so
these run whether or not weights/*_real.pt are there."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from apps.demo.models import find_checkpoints
from apps.demo.page import REAL_EXAMPLES_DIR, Demo, _example_description, gallery_order, real_examples
from apps.tasks.inference.classification import ClassificationInference
from apps.tasks.inference.detection import DetectionInference
from vision.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
CATEGORIES = ["cat_face", "cup", "rocket", "astronaut", "coin", "digit", "face"]
SINGLE = ["cat_face", "cup", "rocket", "astronaut"]
SCENES = "real-imagery scenes (benchmarks/realset.py)"
CROPS = "real-imagery crops (benchmarks/realset.py)"


def as_real(source: str, trained_on: str, classes: list[str], **extra) -> dict:
    """A shipped shapes checkpoint made to say what a real-photo one says (its weights do not matter here)."""
    ckpt = load_checkpoint(WEIGHTS / source)
    ckpt["trained_on"] = trained_on
    ckpt["classes"] = [{"id": i, "name": n} for i, n in enumerate(classes)]
    return {**ckpt, **extra}


@pytest.fixture()
def weights_dir(tmp_path) -> Path:
    """A weights folder: two shapes models, and real-data ones named to sort after them (zz_*)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("faster_rcnn_shapes.pt", "classifier_shapes.pt"):
        shutil.copyfile(WEIGHTS / name, folder / name)
    save_checkpoint(as_real("faster_rcnn_shapes.pt", SCENES, CATEGORIES, single_photo_classes=SINGLE),
                    folder / "zz_detector.pt")
    classifier = as_real("classifier_shapes.pt", CROPS, sorted([*CATEGORIES, "background"]),
                         single_photo_classes=SINGLE)
    classifier["preprocess"] = {**classifier["preprocess"], "none_class": "background"}
    save_checkpoint(classifier, folder / "zz_classifier.pt")
    return folder


def test_the_pickers_open_on_the_real_data_models_then_offer_the_shapes_ones(weights_dir, tmp_path):
    demo = Demo.from_weights([weights_dir])
    try:
        assert demo.cache.labels(DetectionInference) == ["zz_detector.pt", "faster_rcnn_shapes.pt"]
        assert demo.cache.labels(ClassificationInference) == ["zz_classifier.pt", "classifier_shapes.pt"]
        # the tab shows the photographs and folds the shapes scenes away when it opens on a real-data model
        first = demo.cache.checkpoint("zz_detector.pt")
        assert demo.photo_scenes == [str(p) for p in real_examples("scenes")]
        assert gallery_order(first, demo.examples, demo.photo_scenes) == (
            demo.photo_scenes, demo.examples, "Synthetic shapes (for the shapes models)")
        shapes = demo.cache.checkpoint("faster_rcnn_shapes.pt")
        shown = gallery_order(shapes, demo.examples, demo.photo_scenes)
        assert shown[:2] == (demo.examples, demo.photo_scenes)
        assert gallery_order(first, demo.examples, [])[:2] == (demo.examples, [])
    finally:
        demo.close()
    # the user's own checkpoint still comes first, a shapes one included
    mine = save_checkpoint(load_checkpoint(WEIGHTS / "faster_rcnn_shapes.pt"), tmp_path / "exp1" / "best.pt")
    found, _ = find_checkpoints([weights_dir], [mine])
    detectors = [c.label for c in found if c.is_a(DetectionInference)]
    assert detectors == ["exp1/best.pt", "zz_detector.pt", "faster_rcnn_shapes.pt"]
    # a checkpoint whose data says "synthetic" goes after the real ones, whatever its name
    save_checkpoint(as_real("faster_rcnn_shapes.pt", "synthetic shapes (mine)", ["circle", "dog"]),
                    weights_dir / "a_synthetic.pt")
    found, _ = find_checkpoints([weights_dir])
    assert [c.label for c in found if c.is_a(DetectionInference)] == [
        "zz_detector.pt", "a_synthetic.pt", "faster_rcnn_shapes.pt"]


def test_the_line_names_the_categories_and_the_single_photographs(weights_dir):
    found, _ = find_checkpoints([weights_dir])
    by_label = {c.label: c for c in found}
    detector, classifier = by_label["zz_detector.pt"], by_label["zz_classifier.pt"]
    assert not detector.synthetic and detector.result_note() == ""
    assert detector.expectations() == (
        "Trained on real-imagery scenes (benchmarks/realset.py); it knows 7 classes: cat_face, cup, rocket, "
        "astronaut, coin, digit, face. cat_face, cup, rocket and astronaut were each learned from a single "
        "photograph: those very things, not their categories.")
    line = classifier.expectations()
    # "background" is its "none of these", not a category it knows
    assert line.startswith("Trained on real-imagery crops (benchmarks/realset.py); it knows 7 classes: "
                           "astronaut, cat_face, coin, cup, digit, face, rocket.")
    assert 'Anything else is "none of these"' in line and "never seen a real photograph" not in line
    assert by_label["faster_rcnn_shapes.pt"].single_photo == []
    assert "single photograph" not in by_label["faster_rcnn_shapes.pt"].expectations()


def _slim_module():
    spec = importlib.util.spec_from_file_location("slim", WEIGHTS / "slim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slim_records_the_single_photo_classes(tmp_path):
    slim = _slim_module()
    ckpt = as_real("classifier_shapes.pt", CROPS, ["circle", "cup", "triangle"])
    src = save_checkpoint(ckpt, tmp_path / "a.pt")
    out = slim.slim(src, tmp_path / "b.pt", single_photo=["cup"])
    assert out["single_photo_classes"] == ["cup"]
    assert load_checkpoint(tmp_path / "b.pt")["single_photo_classes"] == ["cup"]
    assert "single_photo_classes" not in slim.slim(src, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="--single-photo rocket: not among its classes"):
        slim.slim(src, tmp_path / "d.pt", single_photo=["rocket"])


def test_build_sh_names_the_categories_cut_from_one_photograph():
    # weights/build.sh's single_photo() reads them from the sources; the demo's wording assumes these four
    from benchmarks.realset import CATEGORIES as IDS
    from benchmarks.realset_sources import load_objects

    assert [IDS[c] for c, pool in sorted(load_objects().items()) if len(pool) == 1] == SINGLE
    assert (WEIGHTS / "build.sh").read_text().count('--single-photo "$(single_photo)"') == 3


def test_the_real_examples_are_what_pick_real_examples_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("pick", WEIGHTS / "pick_real_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(tmp_path) == 0
    shipped = json.loads((REAL_EXAMPLES_DIR / "examples.json").read_text())
    assert json.loads((tmp_path / "examples.json").read_text()) == shipped
    sizes = [(REAL_EXAMPLES_DIR / name).stat().st_size for name in shipped]
    assert max(sizes) < 150_000 and sum(sizes) < 1_000_000
    # every picture has an accessible name saying what is in it; scenes carry their boxes
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == sorted(shipped)
    for name, entry in shipped.items():
        assert _example_description(REAL_EXAMPLES_DIR / name) == entry["caption"]
        assert entry["caption"].startswith("Example ")
        where = entry["source"] if name.startswith("photo_") else "benchmarks/realset.py validation"
        assert where in entry["caption"], entry
    assert [p.name for p in real_examples("scenes")] == ["scene_real_1.jpg", "scene_real_2.jpg",
                                                          "photo_lion.jpg"]
    assert all(shipped[p.name]["label"] for p in real_examples("classification")
               if p.name != "photo_lion.jpg")
