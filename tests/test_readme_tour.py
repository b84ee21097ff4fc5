"""The README's ten-minute tour, run as written at tiny sizes: the commands are read from README.md's marked
block (`<!-- tour ... -->`), so the README and the code cannot drift apart. Sizes and time are the only
changes: 16 images instead of 1,000, one epoch instead of the 4m30s budget, no worker processes; the demo
is not served, but the checkpoints it would offer are checked (the user's run first)."""

import json
import shlex
from pathlib import Path

import pytest

from apps.cli import build_parser, main
from apps.demo.models import find_checkpoints
from apps.demo.run import DemoOptions, _sources
from apps.tasks.inference.detection import DetectionInference

ROOT = Path(__file__).resolve().parents[1]
# option -> the tiny value that replaces the README's (each must be found: a renamed option fails the test)
SMALLER = {"--num-images": "16"}
EXTRA = {  # appended to a command, by its name
    "train": ["train.time_budget=null", "train.epochs=1", "train.warmup_iters=1", "data.workers=0"],
    "evaluate": ["--workers", "0"],
    "predict": ["--workers", "0", "--no-progress"],
}


def tour_commands() -> list[list[str]]:
    """The `visiondet ...` lines of the README's tour block, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("<!-- tour") == 1 and "<!-- /tour -->" in text, "the tour block's markers are missing"
    block = text.split("<!-- tour", 1)[1].split("<!-- /tour -->", 1)[0]
    code = block.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in code.splitlines():
        line = line.split("  #", 1)[0].strip()
        if not line or line.startswith("source "):
            continue
        argv = shlex.split(line)
        assert argv[0] == "visiondet", line
        commands.append(argv[1:])
    return commands


def smaller(argv: list[str], used: set[str]) -> list[str]:
    out = list(argv)
    for option, value in SMALLER.items():
        if option in out:
            out[out.index(option) + 1] = value
            used.add(option)
    return out + EXTRA.get(argv[0], [])


def test_the_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = tour_commands()
    assert [c[0] for c in commands] == ["synth", "data", "train", "evaluate", "predict", "evaluate", "demo"]
    for name in ("configs", "weights"):  # the tour runs in a checkout: its paths are relative to one
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    used: set[str] = set()
    outputs = []
    for argv in commands[:-1]:
        argv = smaller(argv, used)
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (argv, out[-2000:], err[-2000:])
        outputs.append((argv, out, err))
    assert used == set(SMALLER), "an option the test makes smaller is gone from the tour"

    check, evaluated, predicted, scored = (outputs[i] for i in (1, 3, 4, 5))
    assert "detector: configs/detection/faster_rcnn_r18_fpn_shapes_quick.yaml" in check[1]  # the tour's model
    assert "YOUR_CONFIG" not in check[1]
    assert Path("runs/detection/exp1/best.pt").is_file()
    assert json.loads(Path("runs/detection/exp1/best_eval.json").read_text())["task"] == "detection"
    assert "AP50" in evaluated[1]
    annotations = Path("data/shapes_det/val/annotations.json").resolve()
    assert f"image ids from {annotations}" in predicted[2]
    assert "AP50" in scored[1] and "matched" not in scored[2]  # predict's ids are the ground truth's

    demo = build_parser().parse_args(commands[-1])
    folders, chosen = _sources(DemoOptions(weights=demo.weights))
    found, problems = find_checkpoints(folders, chosen)
    detectors = [c for c in found if c.is_a(DetectionInference)]
    assert not problems and detectors[0].label == "exp1/best.pt · shapes_det (train)"
    # then the shipped ones: the real-photo detector where weights/ has it, then the shapes ones
    real = [p.name for p in folders[0].glob("faster_rcnn_real.pt")]
    assert [c.path.name for c in detectors[1:]] == [*real, "faster_rcnn_shapes.pt", "fast_rcnn_shapes.pt",
                                                     "rcnn_shapes.pt"]


@pytest.mark.parametrize("line, expected", [
    ("visiondet synth --out d  # a comment", ["synth", "--out", "d"]),
])
def test_the_tour_parser_reads_commands_and_drops_comments(line, expected, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n<!-- tour -->\n```bash\nsource .venv/bin/activate\n{line}\n```\n<!-- /tour -->\n")
    monkeypatch.setattr("test_readme_tour.ROOT", tmp_path)
    assert tour_commands() == [expected]
