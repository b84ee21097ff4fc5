"""benchmarks/real_imagery.py, real_classification.py and real_segmentation.py end to end at toy sizes
(--smoke): the set is built, both recipes train for a few seconds at once, the same code scores both; and
real_imagery.py's arithmetic over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is scripts beside the package, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import real_classification, real_imagery, real_segmentation  # noqa: E402


@pytest.mark.slow  # about 12 s of CPU each: the set is built, two processes start torch
def test_classification_smoke(tmp_path, capsys):
    assert real_classification.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert list(rows) == ["torchvision reference", "visiondet resnet18_real_cpu"]
    for row in rows.values():
        assert 0.0 <= row["top1"] <= 1.0 and row["steps"] >= 1 and row["gain"] == row["top1"] - row["chance"]
    assert "gain over chance" in capsys.readouterr().out


@pytest.mark.slow
def test_segmentation_smoke(tmp_path, capsys):
    assert real_segmentation.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert list(rows) == ["torchvision reference", "visiondet deeplabv3plus_r18_real_cpu"]
    for row in rows.values():
        assert 0.0 <= row["mIoU"] <= 1.0 and row["steps"] >= 1 and "IoU/background" in row
    assert "mIoU ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_imagery_smoke_runs_each_seed_with_both_recipes(tmp_path, capsys):
    assert real_imagery.main(["--smoke", "--threads", "1", "--seed", "3", "--seeds", "2",
                              "--json", str(tmp_path / "rows.json")]) == 0
    written = json.loads((tmp_path / "rows.json").read_text())
    assert list(written["runs"]) == ["3", "4"]
    for seed, rows in written["runs"].items():
        assert list(rows) == ["torchvision reference", "visiondet faster_rcnn_r18_fpn_cpu"]
        assert rows["visiondet faster_rcnn_r18_fpn_cpu"]["seed"] == int(seed)  # the reference's seed, both
        assert all(0.0 <= row["AP"] <= row["AP50"] <= 1.0 and row["steps"] >= 1 for row in rows.values())
    out = capsys.readouterr().out
    assert "mean +- standard deviation over 2 seeds" in out and "the goals ask for the mean of three" in out


def test_imagery_summary_and_goals_by_hand():
    ours, ref = "visiondet faster_rcnn_r18_fpn_cpu", real_imagery.REFERENCE
    row = lambda ap, ap50, steps: {"AP": ap, "AP50": ap50, "AP_small": 0.5, "steps": steps,  # noqa: E731
                                   "minutes": 20.0}
    runs = {0: {ref: row(0.10, 0.30, 190), ours: row(0.70, 0.86, 1700)},
            1: {ref: row(0.12, 0.28, 186), ours: row(0.66, 0.87, 1720)},
            2: {ref: row(0.11, 0.32, 194), ours: row(0.68, 0.85, 1710)}}
    summary = real_imagery.summarize(runs)
    assert summary[ours]["AP"] == pytest.approx((0.68, 0.02))  # sample sd of 0.70, 0.66, 0.68
    assert summary[ref]["AP50"] == pytest.approx((0.30, 0.02))
    assert summary[ours]["steps"] == pytest.approx((1710.0, 10.0))
    ap, ap50 = real_imagery.goal_lines(summary, seeds=3)
    # AP: 0.68 >= 0.65 and 0.68 / 0.11 = 6.18x; AP50: 0.86 < 0.88 by 0.02 and 0.86 / 0.30 = 2.87x < 3x
    assert ap.startswith("AP 0.680 (goal >= 0.65: met), 6.18x") and ap.endswith("(goal >= 3x: met)")
    assert ap50.startswith("AP50 0.860 (goal >= 0.88: missed by 0.020), 2.87x") and ap50.endswith("missed)")
