"""`visiondet predict` end to end on messy folders the tests build, with a real (tiny) checkpoint."""

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.cli import main
from apps.predict.predictor import Predictor
from vision.checkpoint import save_checkpoint
from vision.classification import Classifier, ClassifierConfig
from vision.data.images import read_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 5, "name": "triangle"}]


def classifier_checkpoint(path: Path, size: int = 32) -> Path:
    torch.manual_seed(0)
    cfg = ClassifierConfig(backbone="resnet18", num_classes=3)
    model = Classifier(cfg, load_pretrained=False)
    ckpt = {"format": "visiondet", "version": 1, "task": "classification", "model": dataclasses.asdict(cfg),
            "classes": CLASSES, "preprocess": {"size": size}, "state_dict": model.state_dict()}
    return save_checkpoint(ckpt, path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return classifier_checkpoint(tmp_path_factory.mktemp("ckpt") / "cls.pt")


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    image.save(path, **kw)
    return path


def messy_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """Readable image names, and the unreadable ones with the error kind each must get."""
    save(root / "a" / "img.jpg", noise(64, 96, 1))
    save(root / "b" / "img.jpg", noise(64, 96, 2))
    save(root / "b" / "deep" / "rgba.png", Image.fromarray(noise(20, 20, 3)).convert("RGBA"))
    save(root / "c.bmp", noise(16, 16, 4))
    save(root / "d.tif", noise(16, 24, 5))
    save(root / "e.webp", noise(16, 16, 6))
    save(root / "cmyk.jpg", Image.fromarray(noise(16, 16, 7)).convert("CMYK"))
    save(root / "gray16.png", Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 150))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high; shown rotated: 20 wide x 40 high
    save(root / "rotated.jpg", noise(20, 40, 8), exif=exif)
    save(root / "ünï cødé 画像 x.png", noise(16, 16, 9))
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64, 10)).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture\n")
    (root / "notes.txt").write_text("ignored: no image extension\n")
    good = {"a/img.jpg", "b/img.jpg", "b/deep/rgba.png", "c.bmp", "d.tif", "e.webp", "cmyk.jpg", "gray16.png",
            "rotated.jpg", "ünï cødé 画像 x.png"}
    return good, {"truncated.jpg": "truncated", "zero.png": "empty", "text.jpg": "not an image"}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def predict(*args) -> int:
    return main(["predict", "--no-progress", *map(str, args)])


def test_messy_folder_end_to_end(weights, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    good, bad = messy_folder(src)
    code = predict("--weights", weights, "--source", src, "--output", out, "--workers", 2, "--batch-size", 4,
                   "--save-images", "--format", "jsonl", "csv")
    assert code == 0
    records = {r["file"]: r for r in lines(out / "predictions.jsonl")}
    assert set(records) == good
    assert (records["rotated.jpg"]["width"], records["rotated.jpg"]["height"]) == (20, 40)  # EXIF applied
    assert (records["a/img.jpg"]["width"], records["a/img.jpg"]["height"]) == (96, 64)
    for r in records.values():
        assert [t["category_id"] for t in r["topk"]] != [] and len(r["topk"]) == 3  # top-5 of 3 classes
        assert sum(t["score"] for t in r["topk"]) == pytest.approx(1.0, abs=1e-4)
    errors = {e["file"]: e for e in lines(out / "errors.jsonl")}
    assert {name: e["error"] for name, e in errors.items()} == bad
    assert errors["zero.png"]["path"] == str(src / "zero.png") and "0 bytes" in errors["zero.png"]["reason"]

    # the stream gives what the in-memory path gives for the same picture
    predictor = Predictor(weights, "cpu")
    [direct] = predictor.predict([read_image(src / "rotated.jpg")])
    streamed = records["rotated.jpg"]["topk"]
    assert [t["name"] for t in streamed] == direct.names
    np.testing.assert_allclose([t["score"] for t in streamed], direct.scores, atol=1e-4)

    # drawn copies mirror the tree: two img.jpg never collide
    a, b = (np.asarray(Image.open(out / "images" / d / "img.jpg")) for d in "ab")
    assert a.shape == (64, 96, 3) and not np.array_equal(a, b)
    assert (out / "images" / "ünï cødé 画像 x.png").is_file()
    assert not (out / "images" / "zero.png").exists()

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["failed"], summary["skipped"], summary["not_images"]) == (10, 3, 0, 1)
    assert summary["images_found"] == 13 and summary["processed_this_run"] == 13
    assert sum(summary["top1_per_class"].values()) == 10
    assert summary["device"] == "cpu" and summary["images_per_second"] > 0 and summary["wall_time_s"] > 0
    rows = list(csv.reader(open(out / "predictions.csv", encoding="utf-8")))
    assert rows[0] == ["file", "width", "height", "rank", "category_id", "name", "score"]
    assert len(rows) == 1 + 3 * 10

    # existing outputs: refused, resumed (nothing left to do) or overwritten
    assert predict("--weights", weights, "--source", src, "--output", out) == 2
    assert "--resume" in capsys.readouterr().err
    assert predict("--weights", weights, "--source", src, "--output", out, "--resume", "--workers", 0) == 0
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["done"], summary["failed"], summary["skipped"], summary["processed_this_run"]
    assert counts == (10, 3, 10, 3)
    assert len(lines(out / "predictions.jsonl")) == 10 and len(lines(out / "errors.jsonl")) == 3
    assert predict("--weights", weights, "--source", src / "a", "--output", out, "--overwrite",
                   "--workers", 0) == 0
    assert [r["file"] for r in lines(out / "predictions.jsonl")] == ["img.jpg"]
    assert not (out / "images").exists() and not (out / "predictions.csv").exists()


def test_nothing_readable_exits_non_zero(weights, tmp_path):
    src = tmp_path / "src"
    save(src / "big.png", noise(40, 40, 0))
    (src / "empty.jpg").write_bytes(b"")
    code = predict("--weights", weights, "--source", src, "--output", tmp_path / "out", "--workers", 0,
                   "--max-pixels", 1000)
    assert code == 1
    kinds = {e["file"]: e["error"] for e in lines(tmp_path / "out" / "errors.jsonl")}
    assert kinds == {"big.png": "too many pixels", "empty.jpg": "empty"}


def test_output_inside_source_only_when_asked_and_never_read(weights, tmp_path, capsys):
    src = tmp_path / "src"
    save(src / "x.png", noise(16, 16, 0))
    out = src / "predictions"
    assert predict("--weights", weights, "--source", src, "--output", out, "--workers", 0) == 2
    assert "inside the source folder" in capsys.readouterr().err and not out.exists()
    args = ["--weights", weights, "--source", src, "--output", out, "--workers", 0, "--allow-inside-source",
            "--save-images"]
    assert predict(*args) == 0
    assert predict(*args, "--overwrite") == 0  # images/x.png now lies inside src: it must not be read
    assert [r["file"] for r in lines(out / "predictions.jsonl")] == ["x.png"]


def test_bad_arguments_are_clear_errors(weights, tmp_path, capsys):
    src = tmp_path / "src"
    save(src / "x.png", noise(16, 16, 0))
    assert predict("--weights", tmp_path / "none.pt", "--source", src, "--output", tmp_path / "o") == 2
    assert "none.pt: no such checkpoint file" in capsys.readouterr().err
    assert predict("--weights", weights, "--source", tmp_path / "nope", "--output", tmp_path / "o") == 2
    assert "nope: no such file, folder or glob match" in capsys.readouterr().err
    assert predict("--weights", weights, "--source", src, "--output", tmp_path / "o", "--format", "coco") == 2
    assert "COCO results need a detection checkpoint" in capsys.readouterr().err
    assert predict("--weights", weights, "--source", src, "--output", tmp_path / "o", "--classes", "dog") == 2
    assert "'dog' is not one of the checkpoint's classes" in capsys.readouterr().err


def test_gpu_saved_checkpoint_runs_on_cpu(tmp_path):
    """A checkpoint whose tensors are tagged cuda:0 (as torch.save writes them on a GPU machine)."""
    import torch.serialization as ser

    def as_cuda(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    ser.register_package(0, as_cuda, lambda storage, location: None)
    try:
        weights = classifier_checkpoint(tmp_path / "gpu.pt")
    finally:
        ser._package_registry[:] = [p for p in ser._package_registry if p[1] is not as_cuda]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(weights, weights_only=True)  # really a GPU checkpoint
    save(tmp_path / "src" / "x.png", noise(16, 16, 0))
    assert predict("--weights", weights, "--source", tmp_path / "src", "--output", tmp_path / "out",
                   "--workers", 0, "--device", "cpu") == 0


@pytest.mark.slow
def test_resume_after_killed_run_does_every_image_once(tmp_path):
    weights = classifier_checkpoint(tmp_path / "cls.pt", size=64)
    src, out = tmp_path / "src", tmp_path / "out"
    n = 16
    for i in range(n):
        save(src / f"d{i % 3}" / f"{i:03d}.png", noise(48, 48, i))
    args = ["--weights", weights, "--source", src, "--output", out, "--batch-size", 1, "--workers", 0,
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "predict", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "predictions.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the run was not interrupted: {stderr}"
    first = journal.read_text(encoding="utf-8").count("\n")
    assert 3 <= first < n
    assert not (out / "summary.json").exists()

    assert predict(*args, "--resume") == 0
    names = [r["file"] for r in lines(journal)]
    assert len(names) == n and len(set(names)) == n  # everything, nothing twice
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == first and summary["processed_this_run"] == n - first


@pytest.mark.slow
def test_torchrun_two_processes_take_disjoint_shards_and_merge(weights, tmp_path):
    """`torchrun --nproc_per_node 2 -m apps.cli predict ...` on CPU (gloo): one set of outputs."""
    src, out = tmp_path / "src", tmp_path / "out"
    names = [f"{d}/{i}.png" for d, i in [("a", 0), ("a", 1), ("b", 2), ("b", 3), ("c", 4), ("c", 5)]]
    for i, name in enumerate(names):
        save(src / name, noise(16, 16, i))
    (src / "c" / "6.png").write_bytes(b"")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "apps.cli", "predict", "--weights", str(weights), "--source", str(src), "--output", str(out),
           "--workers", "0", "--device", "cpu", "--save-images", "--no-progress"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["file"] for r in lines(out / "predictions.jsonl")] == names  # one set, in sorted order
    assert [e["file"] for e in lines(out / "errors.jsonl")] == ["c/6.png"]
    assert not (out / ".shards").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu x 2 processes"
    # 7 files: rank 0 takes the first 3, rank 1 the other 4 (the unreadable one among them)
    assert [(p["done"], p["failed"]) for p in summary["processes"]] == [(3, 0), (3, 1)]
    assert len(list((out / "images").rglob("*.png"))) == 6
