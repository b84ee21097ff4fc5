"""One file that cannot be decoded, met by a DataLoader worker during `visiondet train` or `evaluate`: one
line naming the file and the reason (no worker traceback), no stub run folder, and with
``data.skip_unreadable=true`` (``--skip-unreadable``) the file is skipped, listed and counted.

The sets are real ImageFolder trees of PNG files written here, one of them cut in half (its header is
intact, so only decoding finds it), loaded by two real worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset, default_collate

from apps.cli import main
from apps.engine.loader import SeededItems, UnreadableImageError, eval_loader, make_loader
from vision.checkpoint import load_checkpoint
from vision.data.images import ImageError

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (40, 60, 220), "red": (220, 50, 40)}


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{i}.png"), image)
    return root


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def experiment(tmp_path: Path, *, bad_train: bool, bad_val: bool) -> tuple[Path, list[Path]]:
    train, val = write_folder(tmp_path / "train", 4, 0), write_folder(tmp_path / "val", 2, 1)
    bad = ([truncate(train / "red" / "1.png")] if bad_train else []) + (
        [truncate(val / "blue" / "0.png")] if bad_val else [])
    config = {
        "base": str(ROOT / "configs" / "base" / "classification.yaml"),
        "model": {"backbone": "resnet18"},
        "data": {"train": {"root": str(train)}, "val": {"root": str(val)}, "workers": 2,
                 "options": {"size": 32}},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.05, "log_every": 1},
        "device": "cpu",
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, bad


def error_line(err: str) -> str:
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    return err.strip().splitlines()[-1]


def test_an_unreadable_training_image_ends_the_run_with_one_line_and_no_stub_folder(tmp_path, capsys):
    config, [bad] = experiment(tmp_path, bad_train=True, bad_val=False)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={run}"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bad}: ") and "truncated" in line
    assert "visiondet data check" in line and "data.skip_unreadable=true" in line
    assert not run.exists()  # it held no checkpoint: nothing to resume, nothing left behind

    # skipped instead: listed once (it is met in both epochs), counted in the summary, and training ran on
    assert main(["train", str(config), f"output_dir={run}", "data.skip_unreadable=true"]) == 0
    out = capsys.readouterr()
    assert "1 unreadable images skipped" in out.out
    assert (run / "skipped_images.txt").read_text().splitlines() == [f"{bad}\t" + line.split(": ", 2)[2]
                                                                     .split(";")[0]]
    state = load_checkpoint(run / "last.pt")["train_state"]
    assert (state["epoch"], state["step"]) == (2, 4)  # 7 readable images still make 2 full batches an epoch
    assert f"skipped unreadable image {bad}" in (run / "train.log").read_text()


def test_an_unreadable_validation_image_keeps_the_epoch_and_the_run_resumes_skipping_it(tmp_path, capsys):
    config, [bad] = experiment(tmp_path, bad_train=False, bad_val=True)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={run}"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bad}: ") and f"--resume {run} data.skip_unreadable=true" in line
    # the first epoch's training is kept (resumable) and train.log says why the run stopped
    assert load_checkpoint(run / "last.pt")["train_state"]["epoch"] == 1
    assert (run / "train.log").read_text().strip().splitlines()[-1].endswith(line.removeprefix("error: "))

    # resuming with skipping is not a change of data: no --force needed
    assert main(["train", "--resume", str(run), "data.skip_unreadable=true"]) == 0
    assert "1 unreadable images skipped" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["train_state"]["epoch"] == 2

    # `visiondet evaluate` on the same folder: one line, or skipped and counted with --skip-unreadable
    args = ["evaluate", "--weights", str(run / "last.pt"), "--root", str(tmp_path / "val"), "--workers", "2",
            "--device", "cpu", "--out", str(tmp_path / "eval.json")]
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bad}: ") and "--skip-unreadable" in line
    assert main([*args, "--skip-unreadable"]) == 0
    assert f"skipped unreadable image {bad}" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["skipped_images"] == 1 and metrics["images"] == 3


class _Flaky(Dataset):
    """Items are their index; the files of ``bad`` indices cannot be decoded."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.bad:
            raise ImageError(f"img{i}.jpg", "truncated file")
        return torch.tensor(float(i))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_substitutes_skipped_items_and_raises_one_line_otherwise(workers):
    batches = [[0, 1], [2, 3], [4, 5]]
    skipped = []
    items = SeededItems(_Flaky(6, {2, 3}), seed=0, skip_unreadable=True)
    loader = make_loader(items, batches, default_collate, workers=workers, pin_memory=False, seed=0,
                         on_skip=skipped.extend)
    got = [(indices, batch.tolist()) for indices, batch in loader]
    # the two unreadable items take the next readable one (4) in their place: the batch keeps its size
    assert got == [([0, 1], [0.0, 1.0]), ([2, 3], [4.0, 4.0]), ([4, 5], [4.0, 5.0])]
    assert [u.path for u in skipped] == ["img2.jpg", "img3.jpg", "img3.jpg"]

    strict = make_loader(SeededItems(_Flaky(6, {3}), seed=0), batches, default_collate, workers=workers,
                         pin_memory=False, seed=0, hint="run `visiondet data check`")
    with pytest.raises(UnreadableImageError) as caught:
        list(strict)
    assert str(caught.value) == "img3.jpg: truncated file; run `visiondet data check`"

    # evaluation drops what it cannot read and keeps the order of the rest
    dropped = []
    evaluation = eval_loader(_Flaky(6, {0, 1, 4}), default_collate, batch_size=2, workers=workers,
                             skip_unreadable=True, on_skip=dropped.extend)
    assert [b.tolist() for b in evaluation] == [[2.0, 3.0], [5.0]]
    assert [u.path for u in dropped] == ["img0.jpg", "img1.jpg", "img4.jpg"]
