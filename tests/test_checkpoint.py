"""vision.checkpoint: atomic save, weights_only load, clear errors."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch

from vision.checkpoint import CheckpointError, is_visiondet_checkpoint, load_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_round_trip_of_a_checkpoint_dict(tmp_path):
    ckpt = {"format": "visiondet", "version": 1, "task": "classification", "model": {"backbone": "resnet18"},
            "classes": [{"id": 7, "name": "cat"}], "state_dict": {"w": torch.arange(6.0).view(2, 3)},
            "metrics": {"top1": 0.5}}
    path = save_checkpoint(ckpt, tmp_path / "sub" / "model.pt")  # missing folders are created
    loaded = load_checkpoint(path)
    assert loaded["classes"] == [{"id": 7, "name": "cat"}] and loaded["metrics"] == {"top1": 0.5}
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(6.0).view(2, 3))
    assert is_visiondet_checkpoint(loaded)
    assert not is_visiondet_checkpoint({"w": torch.zeros(1)})
    assert not is_visiondet_checkpoint({"format": "visiondet"})  # no state_dict


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = save_checkpoint({"v": 1}, tmp_path / "model.pt")
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        save_checkpoint({"v": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_missing_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint({"w": torch.zeros(100)}, tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot load checkpoint"):
        load_checkpoint(path)


def test_files_that_are_no_checkpoint_at_all_get_one_plain_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, these are not weights\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "photo.pt").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # a JPEG under a .pt name
    for name in ("notes.txt", "empty.pt", "photo.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}: not a visiondet or PyTorch checkpoint"):
            load_checkpoint(tmp_path / name)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: .*refused for safety"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof that the payload is live
    assert marker.exists()


def test_an_exported_graph_passed_as_a_checkpoint_says_what_it_is_and_what_to_use(tmp_path):
    # a TorchScript file as `visiondet export` writes it: the graph, extra/visiondet.json naming its source
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "detector.ts"),
                   _extra_files={"visiondet.json": json.dumps({"checkpoint": "best.pt"})})
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "detector.ts")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'detector.ts'}: a TorchScript export made by `visiondet export` "
                              "from best.pt, not a checkpoint: pass the visiondet checkpoint (.pt) it was "
                              "exported from (best.pt) to --weights")
    assert "--backend onnxruntime" in message and "weights_only" not in message and "\n" not in message
    (tmp_path / "detector.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # ir_version 8, producer ...
    with pytest.raises(CheckpointError, match=r"detector\.onnx: an ONNX export, not a checkpoint"):
        load_checkpoint(tmp_path / "detector.onnx")
    save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "plain.pt")  # a zip, but no graph
    assert load_checkpoint(tmp_path / "plain.pt")["state_dict"]["w"].shape == (1,)


def test_version_names_visiondet_torch_and_torchvision(capsys):
    from importlib.metadata import version

    from apps.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"visiondet {version('visiondet')} (torch {version('torch')}, torchvision "
                           f"{version('torchvision')}, Python 3.")
