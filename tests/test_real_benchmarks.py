"""benchmarks/real_classification.py and benchmarks/real_segmentation.py end to end at toy sizes (--smoke):
the set is built, both recipes train for a few seconds at once, the same code scores both."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is scripts beside the package, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import real_classification, real_segmentation  # noqa: E402


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
