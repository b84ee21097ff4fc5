"""Faster R-CNN R50-FPN at 800 px on the CPU: torchvision eager, visiondet eager (prepared for inference),
visiondet on ONNX Runtime (fp32, and with the box head's fully connected layers quantised to int8).

    python benchmarks/export.py                   # 800 px, 3 repeats, the shapes-set AP of the int8 head
    python benchmarks/export.py --repeats 5 --skip-ap

Same weights everywhere: torchvision's fasterrcnn_resnet50_fpn with random weights (its frozen batch norms
given the statistics of the image, as in benchmarks/detector_speed.py), converted into visiondet's
TwoStageDetector by detection/convert.py. The ONNX file is written by ``vision.export.export_graph`` (so
it is checked against PyTorch on two image sizes first) and run with every graph optimisation and as many
intra-op threads as torch uses; ``--ort-levels`` adds runs at other optimisation levels. The int8 variant is
``onnxruntime.quantization.quantize_dynamic`` on the box head's Gemm/MatMul nodes (fc6, fc7: 13.9 M of the
model's 41 M weights). All paths keep every detection scoring over 0.05 (no 100 cap, so that torchvision's
"N/A" classes cannot push others out); runs alternate between the paths so a busy machine slows them alike;
medians and ratios to torchvision are printed, then each path's detections against torchvision's and
visiondet's. Last, the AP change of the int8 box head on a small synthetic shapes set (weights/
faster_rcnn_shapes.pt, ``visiondet synth`` val images), against the same model's fp32 file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, not benchmarks/, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torchvision

from benchmarks.detector_speed import (
    COMPARE_MAX,
    compare,
    photo_and_same_weights,
    set_postprocess,
    timed,
)
from detection.export import detector_spec
from detection.models import prepare_for_inference
from detection.structures import Detections
from vision.export import Runner, compare_detections, export_graph, require_onnxruntime, session_options


def quantize_box_head(src: Path, dst: Path) -> list[str]:
    """int8 dynamic quantisation (weights int8, activations quantised per call) of the box head's
    fully connected layers only; returns the quantised node names."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [n.name for n in onnx.load(str(src)).graph.node
             if n.op_type in ("Gemm", "MatMul") and "box_head" in n.name]
    quantize_dynamic(str(src), str(dst), nodes_to_quantize=names, op_types_to_quantize=["Gemm", "MatMul"],
                     weight_type=QuantType.QInt8)
    return names


def as_detections(outputs: list[torch.Tensor]) -> Detections:
    boxes, labels, scores = outputs
    return Detections(boxes, scores, labels.long())


def ort_runner(path: Path, level: str = "all") -> Runner:
    """A Runner whose session uses ``level`` graph optimisation (all, extended, basic, none)."""
    ort = require_onnxruntime()
    runner = Runner(path)
    options = session_options()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    runner.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return runner


def shapes_ap(folder: Path, num_images: int) -> list[tuple[str, dict[str, float]]]:
    """AP of weights/faster_rcnn_shapes.pt on ``num_images`` synthetic val images: PyTorch, ONNX fp32,
    ONNX with the int8 box head."""
    from apps import WEIGHTS_DIR
    from apps.cli import main as cli
    from apps.export import export_checkpoint
    from detection.evaluation import evaluate_coco
    from vision.data.images import read_image

    data = folder / "shapes"
    cli(["synth", "--task", "detection", "--out", str(data), "--num-images", str(num_images * 2),
         "--val-fraction", "0.5", "--seed", "20"])
    weights = WEIGHTS_DIR / "faster_rcnn_shapes.pt"
    fp32, int8 = folder / "shapes.onnx", folder / "shapes_int8.onnx"
    export_checkpoint(weights, "onnx", fp32)
    quantize_box_head(fp32, int8)
    from apps.tasks import load_model

    loaded = load_model(weights)
    model = prepare_for_inference(loaded.model)
    gt = json.loads((data / "val" / "annotations.json").read_text())
    ids = [c["id"] for c in loaded.classes]
    paths = {"PyTorch": None, "ONNX fp32": Runner(fp32), "ONNX int8 box head": Runner(int8)}
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for entry in gt["images"]:
        image = read_image(data / "val" / "images" / entry["file_name"])
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        for name, runner in paths.items():
            if runner is None:
                with torch.inference_mode():
                    det = model([tensor])[0][0]
            else:
                det = as_detections(runner(tensor))
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(),
                                         strict=True):
                results[name].append({"image_id": entry["id"], "category_id": ids[label - 1], "score": score,
                                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    annotations = data / "val" / "annotations.json"
    return [(name, evaluate_coco(annotations, res, backend="pycocotools")) for name, res in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--ort-levels", nargs="*", default=[], choices=("extended", "basic", "none"),
                        help="also time ONNX Runtime at these graph optimisation levels")
    parser.add_argument("--ap-images", type=int, default=40, help="shapes val images for the int8 AP")
    parser.add_argument("--skip-ap", action="store_true")
    args = parser.parse_args()
    require_onnxruntime()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, tv, ours = photo_and_same_weights()
    prepared = prepare_for_inference(ours)
    for model in (tv, prepared):
        model.transform.min_size, model.transform.max_size = (args.size,), round(args.size * 1333 / 800)
    set_postprocess((tv, prepared), 0.05, COMPARE_MAX)

    folder = Path(tempfile.mkdtemp(prefix="visiondet-export-bench-"))
    onnx_path, int8_path = folder / "r50_fpn.onnx", folder / "r50_fpn_int8.onnx"
    # checked on the photo and on a crop of another shape (dynamic size)
    report = export_graph(detector_spec(prepared, {}, images=[image, image[:, 40:340, 100:560].contiguous()]),
                          onnx_path, "onnx")
    print(f"exported in {report.seconds:.1f} s; " + "; ".join(report.checks), flush=True)
    quantized = quantize_box_head(onnx_path, int8_path)
    print(f"int8 dynamic quantisation of {len(quantized)} nodes: {', '.join(quantized)}", flush=True)

    runners = {"ORT fp32": ort_runner(onnx_path)}
    runners.update({f"ORT fp32 ({level})": ort_runner(onnx_path, level) for level in args.ort_levels})
    runners["ORT int8 box head"] = ort_runner(int8_path)
    paths = {"torchvision": lambda: tv([image]), "visiondet prepared": lambda: prepared([image])}
    paths.update({name: (lambda r=r: r(image)) for name, r in runners.items()})

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime "
          f"{require_onnxruntime().__version__}, {torch.get_num_threads()} threads, image "
          f"{tuple(image.shape[1:])} at {args.size} px, median of {args.repeats} runs after one warm-up",
          flush=True)
    runs: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for fn in paths.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in paths.items():
                runs[name].append(timed(fn))
    medians = {name: statistics.median(r) for name, r in runs.items()}
    base = medians["torchvision"]
    print("\n| path | s / image | vs torchvision |\n|---|---:|---:|")
    for name, t in medians.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f}x |")

    with torch.inference_mode():
        theirs = tv([image])[0]
        mine = prepared([image])[0][0]
        print(f"\nvisiondet prepared vs torchvision: {compare(theirs, mine)}")
        for name, runner in runners.items():
            det = as_detections(runner(image))
            print(f"{name} vs torchvision: {compare(theirs, det)}")
            print(f"{name} vs visiondet prepared: {compare(_as_tv(mine), det)}")
            print(f"    with the export check's tolerance: {tolerant(det, mine)}")

    if not args.skip_ap:
        print(f"\nshapes set ({args.ap_images} synthetic val images), weights/faster_rcnn_shapes.pt:")
        table = shapes_ap(folder, args.ap_images)
        reference = table[1][1]
        for name, metrics in table:
            print(f"  {name:20s} AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  "
                  f"(AP change vs ONNX fp32 {metrics['AP'] - reference['AP']:+.4f})")
    shutil.rmtree(folder, ignore_errors=True)


def tolerant(det: Detections, reference: Detections) -> str:
    """The export check's comparison (one-to-one matching, 0.05 px, 1e-3, edge flips allowed) and the
    largest differences of the pairs it matched."""
    outputs = (det.boxes, det.labels, det.scores)
    reason = compare_detections()(outputs, (reference.boxes, reference.labels, reference.scores))
    if reason is not None:
        return f"DIFFERENT: {reason}"
    box_err = score_err = 0.0
    for i in range(len(det)):
        same = torch.where(reference.labels == det.labels[i])[0]
        if len(same):
            dist = (reference.boxes[same] - det.boxes[i]).abs().amax(dim=1)
            j = same[int(dist.argmin())]
            box_err = max(box_err, float(dist.min()))
            score_err = max(score_err, abs(float(reference.scores[j] - det.scores[i])))
    return (f"same ({len(det)} vs {len(reference)} detections; max |box| {box_err:.1e} px, max |score| "
            f"{score_err:.1e} over matched pairs)")


def _as_tv(det: Detections) -> dict[str, torch.Tensor]:
    """visiondet detections in torchvision's output form (COCO ids as labels), for ``compare``."""
    from benchmarks.detector_speed import COCO_IDS

    return {"boxes": det.boxes, "scores": det.scores, "labels": COCO_IDS[det.labels]}


if __name__ == "__main__":
    main()
