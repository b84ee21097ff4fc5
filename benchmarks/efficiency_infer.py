"""The efficiency report's inference, AP and `visiondet predict` rows (see benchmarks/efficiency.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from apps.cli import main as visiondet
from apps.export import calibration_set, export_checkpoint
from apps.tasks import load_model
from benchmarks.detector_speed import COCO_IDS, COMPARE_MAX, compare, like_trained, set_postprocess
from benchmarks.efficiency import Row, interleaved, load, rate, ratio_rows
from benchmarks.efficiency_train import bf16_native, detector_pair
from detection.evaluation import evaluate_coco
from detection.export import detector_spec
from detection.structures import Detections
from detection.torchvision_weights import COCO_CLASSES, convert_torchvision_state_dict
from vision.checkpoint import save_checkpoint
from vision.data.images import read_image
from vision.export import ExportError, Runner, export_graph
from vision.layers import prepare_for_inference
from vision.quantize import detection_agreement, quantize_onnx

REFERENCE = "torchvision eager"
# path name in the inference rows -> how `visiondet predict` runs it
PREDICT_FLAGS = {"visiondet eager prepared": [], "visiondet bf16 autocast": [],
                 "onnxruntime fp32": ["--backend", "onnxruntime"], "onnxruntime int8": ["--int8"]}


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255).contiguous()


def _photo(data: Path) -> torch.Tensor:
    """The realset's first validation photograph (real backgrounds the training images never show)."""
    coco = json.loads((data / "val" / "annotations.json").read_text())
    return _tensor(read_image(data / "val" / "images" / coco["images"][0]["file_name"]))


def same_weights(depth: int, size: int, image: torch.Tensor):
    """torchvision's and our R{depth}-FPN in eval mode with the same random weights, torchvision's frozen
    batch norms given the statistics of ``image`` (as a trained model's would be, see detector_speed) and
    class 1 made likely, so that both find boxes."""
    tv, ours = detector_pair(depth, size, round(size * 1333 / 800))
    tv = like_trained(tv.eval(), image)
    # Random weights score every class alike (about 1/91, under the 0.05 cut), so nothing would be detected:
    # no NMS work, an export check with nothing to compare (export refuses that) and empty agreement rows.
    # Logits spread as a trained model's are (std about 1, not 0.01) and one class made likely give every
    # path detections to post-process, with distinct scores: near-ties at the top-k cut would let two
    # correct float32 backends keep different boxes and fail the export check.
    with torch.no_grad():
        scores = tv.roi_heads.box_predictor.cls_score
        scores.weight.mul_(100.0)
        scores.bias[1] += 3.0
    ours.load_state_dict(convert_torchvision_state_dict(tv.state_dict(), f"faster_rcnn_r{depth}_fpn"))
    return tv, ours.eval()


def write_onnx(model, image: torch.Tensor, path: Path) -> str:
    """Export ``model`` (prepared, contiguous weights) checked as `visiondet export` checks; when the check
    fails on this random-weight model (or compares nothing: no detection), the file is written unchecked
    and the reason returned."""
    spec = detector_spec(model, {}, images=[image])
    try:
        export_graph(spec, path, "onnx")
        return "export check passed"
    except ExportError as exc:
        unchecked = dataclasses.replace(spec, compare=lambda got, expected: None, informative=None)
        export_graph(unchecked, path, "onnx")
        return f"export check failed on this random model ({str(exc).split(': ', 2)[-1][:120]})"


def as_detections(outputs: list[torch.Tensor]) -> Detections:
    boxes, labels, scores = outputs
    return Detections(boxes, scores, labels.long())


def inference_rows(s: Any) -> tuple[list[Row], str]:
    """Seconds per image of every inference path vs torchvision eager; the fastest path's name."""
    image = _photo(s.data)
    tv, ours = same_weights(s.infer_depth, s.infer_size, image)
    prepared = prepare_for_inference(ours)
    set_postprocess((tv, prepared), 0.05, COMPARE_MAX)
    folder = Path(tempfile.mkdtemp(prefix="visiondet-efficiency-"))
    fp32_file, int8_file = folder / "fp32.onnx", folder / "int8.onnx"
    check = write_onnx(prepared.to(memory_format=torch.contiguous_format), image, fp32_file)
    prepared = prepared.to(memory_format=torch.channels_last)
    calibration = calibration_set(s.data / "train" / "images", s.calibration_images)
    quantized = quantize_onnx(fp32_file, int8_file, [(c,) for c in calibration])
    runners = {"onnxruntime fp32": Runner(fp32_file), "onnxruntime int8": Runner(int8_file)}

    def bf16() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return prepared([image])

    paths = {REFERENCE: lambda: tv([image]), "visiondet eager prepared": lambda: prepared([image])}
    if bf16_native():
        paths["visiondet bf16 autocast"] = bf16
    paths.update({name: (lambda r=r: r(image)) for name, r in runners.items()})
    print(f"inference: {check}; int8: {quantized.nodes} weights quantised, {quantized.samples} calibration "
          f"images; {load()}", flush=True)
    with torch.inference_mode():
        runs = interleaved(paths, s.repeats)
        theirs = tv([image])[0]
        outputs = {"visiondet eager prepared": prepared([image])[0][0]}
        if "visiondet bf16 autocast" in paths:
            outputs["visiondet bf16 autocast"] = bf16()[0][0]
        outputs.update({name: as_detections(r(image)) for name, r in runners.items()})
    section = f"inference R{s.infer_depth}-FPN {s.infer_size} px"
    rows = ratio_rows(section, runs, REFERENCE)
    fastest = min((r for r in rows if r.name != REFERENCE), key=lambda r: r.value)
    fastest.goal = ("<=", 0.4)
    expected = (theirs["boxes"], _ours_labels(theirs["labels"]), theirs["scores"])
    for row in rows[1:]:
        det = outputs[row.name]
        found, total = detection_agreement((det.boxes, det.labels, det.scores), expected, score=0.3)
        row.note = (f"vs torchvision: {compare(theirs, det)}; {found}/{total} of its detections scoring "
                    ">= 0.3 found (IoU >= 0.5)")
    if s.ap_weights is not None:
        rows += ap_rows(s, fastest.name, folder)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"inference: done, fastest {fastest.name}; {load()}", flush=True)
    return rows, fastest.name


def _ours_labels(coco_ids: torch.Tensor) -> torch.Tensor:
    """torchvision's labels (COCO ids; its 'N/A' ids become -1) as ours (1..80)."""
    lookup = torch.full((int(COCO_IDS.max()) + 1,), -1, dtype=torch.long)
    lookup[COCO_IDS] = torch.arange(len(COCO_IDS))
    lookup[0] = -1
    return lookup[coco_ids]


def ap_rows(s: Any, fastest: str, folder: Path) -> list[Row]:
    """COCO AP on the realset's validation split of ``s.ap_weights``: PyTorch float32 against ``fastest``."""
    loaded = load_model(s.ap_weights, "cpu")
    model = prepare_for_inference(loaded.model)
    paths: dict[str, Any] = {"PyTorch fp32": lambda t: model([t])[0][0]}
    if fastest in ("onnxruntime fp32", "onnxruntime int8"):
        out = folder / "ap.onnx"
        int8 = s.data / "train" / "images" if fastest.endswith("int8") else None
        export_checkpoint(s.ap_weights, "onnx", out, int8=int8, calibration_images=s.calibration_images)
        runner = Runner(out)
        paths[fastest] = lambda t: as_detections(runner(t))
    elif fastest == "visiondet bf16 autocast":
        def bf16(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model([t])[0][0]
        paths[fastest] = bf16
    annotations = s.data / "val" / "annotations.json"
    gt = json.loads(annotations.read_text())
    ids = [c["id"] for c in loaded.classes]
    results: dict[str, list[dict]] = {name: [] for name in paths}
    with torch.inference_mode():
        for entry in gt["images"]:
            t = _tensor(read_image(s.data / "val" / "images" / entry["file_name"]))
            for name, fn in paths.items():
                det = fn(t)
                for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(),
                                             strict=True):
                    results[name].append({"image_id": entry["id"], "category_id": ids[label - 1],
                                          "score": score,
                                          "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    metrics = {name: evaluate_coco(annotations, res, backend="pycocotools") for name, res in results.items()}
    base = metrics["PyTorch fp32"]["AP"]
    rows = []
    for name, m in metrics.items():
        change = m["AP"] - base
        verdict = "" if name == "PyTorch fp32" else f"; change {change:+.4f} (goal within 0.01: " \
            f"{'met' if abs(change) <= 0.01 else 'missed'})"
        rows.append(Row(f"AP on realset val ({s.ap_weights.name})", name, m["AP"], "AP",
                        note=f"AP50 {m['AP50']:.4f}{verdict}"))
    return rows


# ---- visiondet predict against a plain torchvision loop --------------------------------------------------


def predict_rows(s: Any, fastest: str) -> list[Row]:
    """Images/s of `visiondet predict` (the fastest backend, default workers) against a plain per-image loop
    over torchvision's model with the same weights, on the same real photographs in interleaved chunks."""
    folder = Path(tempfile.mkdtemp(prefix="visiondet-efficiency-predict-"))
    try:
        files = _photographs(s.data, s.predict_images)
        chunks = [files[i::s.predict_chunks] for i in range(s.predict_chunks)]
        for i, chunk in enumerate(chunks):
            (folder / f"chunk{i}").mkdir()
            for f in chunk:
                shutil.copy(f, folder / f"chunk{i}" / f.name)
        image = _tensor(read_image(files[0]))
        tv, ours = same_weights(s.infer_depth, s.predict_size, image)
        weights = _checkpoint(ours, s, folder / "r50.pt")
        flags = PREDICT_FLAGS.get(fastest, [])
        used = fastest if flags else "pytorch backend"  # predict has no bfloat16 backend
        if flags == ["--int8"]:
            flags = ["--int8", str(s.data / "train" / "images")]
        os.environ["VISIONDET_CACHE"] = str(folder / "cache")
        plain: dict[str, Any] = {}

        def loop(i: int) -> None:
            with torch.inference_mode():
                for f in sorted((folder / f"chunk{i}").iterdir()):
                    plain[f.name] = tv([_tensor(read_image(f))])[0]

        def ours_predict(i: int) -> None:
            code = visiondet(["predict", "--weights", str(weights), "--source", str(folder / f"chunk{i}"),
                              "--output", str(folder / f"out{i}"), "--device", "cpu", "--overwrite",
                              "--no-progress", *flags])
            if code != 0:
                raise SystemExit(f"visiondet predict failed with exit code {code}")

        ours_predict(0)  # exports (and quantises) once into the cache: not timed
        times: dict[str, list[float]] = {"plain torchvision loop": [], f"visiondet predict ({used})": []}
        for i, chunk in enumerate(chunks):  # A, B, A, B: each chunk through both
            for name, fn in zip(times, (loop, ours_predict), strict=True):
                start = time.perf_counter()
                fn(i)
                times[name].append(rate(len(chunk), time.perf_counter() - start))
        found, total = _agreement(folder, chunks, plain)
        workers = "2 workers (its default)"
        rows = ratio_rows(f"predict {len(files)} photographs at {s.predict_size} px", times,
                          "plain torchvision loop", "images/s",
                          goals={f"visiondet predict ({used})": (">=", 3.0)},
                          notes={f"visiondet predict ({used})": f"{workers}; {found}/{total} of "
                                 "torchvision's detections scoring >= 0.5 found (same class, IoU >= 0.5)"})
        print(f"predict: done; {load()}", flush=True)
        return rows
    finally:
        os.environ.pop("VISIONDET_CACHE", None)
        shutil.rmtree(folder, ignore_errors=True)


def _photographs(data: Path, count: int) -> list[Path]:
    files = sorted((data / "train" / "images").iterdir()) + sorted((data / "val" / "images").iterdir())
    if len(files) < count:
        raise SystemExit(f"{data}: {len(files)} images, fewer than --predict-images {count}")
    return files[:count]


def _checkpoint(ours, s: Any, path: Path) -> Path:
    from detection.models import DetectorConfig

    cfg = DetectorConfig(arch=f"faster_rcnn_r{s.infer_depth}_fpn", num_classes=80, void_classes=10,
                         min_size=s.predict_size, max_size=round(s.predict_size * 1333 / 800))
    return save_checkpoint({"format": "visiondet", "version": 1, "task": "detection",
                            "model": dataclasses.asdict(cfg), "classes": COCO_CLASSES, "preprocess": {},
                            "state_dict": ours.state_dict(), "trained_on": "random weights (a benchmark)",
                            "metrics": {}}, path)


def _agreement(folder: Path, chunks: list[list[Path]], plain: dict[str, Any]) -> tuple[int, int]:
    """torchvision's detections scoring >= 0.5 that `visiondet predict` found (same class, IoU >= 0.5)."""
    found = total = 0
    for i in range(len(chunks)):
        for line in (folder / f"out{i}" / "predictions.jsonl").read_text().splitlines():
            record = json.loads(line)
            theirs = plain[Path(record["file"]).name]
            dets = record.get("detections", [])
            xywh = [d["bbox"] for d in dets]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xywh]).reshape(-1, 4)
            labels = torch.tensor([d["category_id"] for d in dets], dtype=torch.long)
            scores = torch.tensor([d["score"] for d in dets])
            f, t = detection_agreement((boxes, labels, scores), (theirs["boxes"], theirs["labels"],
                                                                 theirs["scores"]))
            found, total = found + f, total + t
    return found, total
