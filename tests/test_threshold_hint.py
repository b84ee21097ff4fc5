"""No detection above the score threshold but some below it: predict and the demo say so in one line,
with the highest score seen and how to lower the threshold. A detector with random weights scores its
boxes near 1 / (classes + 1), under the default threshold of 0.5, which makes the case."""

from __future__ import annotations

import numpy as np
from PIL import Image

from apps.cli import main
from apps.predict.predictor import Predictor
from apps.predict.results import threshold_hint


def test_the_hint_line():
    assert threshold_hint(0.314, 0.5, "--score-threshold") == (
        "no detection scoring 0.50 or more, but some scoring less (highest 0.31): lower --score-threshold "
        "to see them")
    assert threshold_hint(0.3, 0.5, "it", images=2, where="x/a.png").startswith(
        "2 image(s) had no detection scoring 0.50 or more, but some scoring less (highest 0.30, in x/a.png)")


def test_predict_names_the_highest_score_under_the_threshold(tmp_path, capsys, tiny_detector_checkpoint):
    weights = tiny_detector_checkpoint(tmp_path / "det.pt")
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for name in ("a.png", "b.png")}
    for name, image in images.items():
        Image.fromarray(image).save(src / name)

    everything = Predictor(weights, "cpu", score_thresh=0.0).predict(list(images.values()))
    best = max(float(r.scores.max()) for r in everything)
    assert 0.05 < best < 0.5  # (random weights: the case this test needs)
    [one] = Predictor(weights, "cpu", score_thresh=0.5).predict([images["a.png"]])
    assert not len(one.labels) and one.best_below == float(everything[0].scores.max())

    args = ["predict", "--weights", str(weights), "--source", str(src), "--no-progress"]
    code = main([*args, "--output", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err
    which = "a.png" if float(everything[0].scores.max()) == best else "b.png"
    assert threshold_hint(best, 0.5, "--score-threshold", images=2, where=which) in err

    # a threshold under the highest score finds something, and there is nothing to say
    code = main([*args, "--output", str(tmp_path / "low"), "--score-threshold", f"{best - 0.01:.4f}"])
    assert code == 0 and "scoring less" not in capsys.readouterr().err


def test_the_demo_says_it_under_the_picture(tmp_path, tiny_detector_checkpoint):
    from apps.demo.handlers import DemoHandlers
    from apps.demo.models import ModelCache, find_checkpoints

    weights = tiny_detector_checkpoint(tmp_path / "det.pt")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    found, problems = find_checkpoints([], [weights])
    assert not problems
    handlers = DemoHandlers(ModelCache(found, "cpu"), max_pixels=10_000_000, max_side=640,
                            files_dir=tmp_path / "files")
    best = float(Predictor(weights, "cpu", score_thresh=0.0).predict([image])[0].scores.max())
    _, rows, _, info = handlers.detect(str(tmp_path / "a.png"), found[0].label, 0.5, 0.5, None)
    assert not rows and threshold_hint(best, 0.5, "the Score threshold slider") in info
    _, rows, _, info = handlers.detect(str(tmp_path / "a.png"), found[0].label, 0.0, 0.5, None)
    assert rows and "scoring less" not in info
