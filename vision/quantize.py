"""Static int8 quantisation of an exported ONNX file, calibrated on real inputs.

``quantize_onnx`` runs ONNX Runtime's static quantiser in QDQ form: the weights of every Conv, Gemm and
MatMul (the backbone, FPN, RPN head and box head of a detector: all of its multiply-adds) become int8 per
output channel, and their input activations uint8 with ranges measured on the calibration samples (min/max
over every sample). ONNX Runtime then runs those nodes as integer convolutions and matrix products
(VNNI/AMX where the processor has them); everything else (resize, RoIAlign, NMS, box decoding) stays float32.
The result is not bit-exact: ``detection_agreement`` says how many of the float model's confident detections
the quantised file still finds.

The calibration samples must look like what the file will see (real images of the training domain): ranges
measured on noise clip real activations. onnx and onnxruntime are optional
(``pip install 'visiondet[export]'``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.ops import box_iou

from vision.export import METADATA_KEY, ExportError, require_onnxruntime

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class QuantizeReport:
    path: Path
    seconds: float
    nodes: int  # Conv/Gemm/MatMul nodes quantised
    samples: int  # calibration samples the activation ranges were measured on


def quantize_onnx(src: str | os.PathLike, out: str | os.PathLike, samples: Sequence[tuple[Tensor, ...]], *,
                  op_types: Sequence[str] = QUANTIZED_OPS,
                  note: dict[str, Any] | None = None) -> QuantizeReport:
    """Write ``src`` (an ONNX file) statically quantised to int8 into ``out``, calibrated on ``samples`` (each
    a tuple of the file's inputs, in order). The file's visiondet metadata is kept, with a ``quantization``
    entry added (``note`` goes into it). Raises ExportError on an empty calibration set or a file ONNX Runtime
    cannot quantise or load; ``out`` is then not written."""
    require_onnxruntime()
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not samples:
        raise ExportError(f"{src}: no calibration samples; int8 quantisation needs real inputs to measure "
                          "activation ranges on")
    src, out = Path(src), Path(out)
    model = onnx.load(str(src), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    metadata = {e.key: e.value for e in model.metadata_props}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{n: t.detach().cpu().contiguous().numpy()
                                for n, t in zip(names, s, strict=True)} for s in samples])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    out.parent.mkdir(parents=True, exist_ok=True)
    pre, tmp = (out.with_name(f".{out.name}.{os.getpid()}.{kind}.tmp") for kind in ("pre", "q"))
    start = time.perf_counter()
    try:
        # Shape inference and graph cleanup first, as ONNX Runtime advises (quantisation needs value shapes).
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        quantized = onnx.load(str(tmp))
        nodes = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                    and any(n.input[0] == i.name for i in quantized.graph.initializer))
        info = json.loads(metadata.get(METADATA_KEY, "{}"))
        info["quantization"] = {"kind": "int8 static (QDQ), per-channel weights, uint8 activations",
                                "ops": list(op_types), "calibration_samples": len(samples), **(note or {})}
        del quantized.metadata_props[:]
        for key, value in {**metadata, METADATA_KEY: json.dumps(info)}.items():
            entry = quantized.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(quantized, str(tmp))
        seconds = time.perf_counter() - start
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions of many kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"{src}: int8 quantisation failed: {reason}; no file written") from None
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return QuantizeReport(out, seconds, nodes, len(samples))


def detection_agreement(got: Sequence[Tensor], expected: Sequence[Tensor], *, score: float = 0.5,
                        iou: float = 0.5) -> tuple[int, int]:
    """(found, total): of the ``expected`` detections (boxes [D, 4], labels [D], scores [D]) scoring at least
    ``score``, how many have a ``got`` detection of the same label scoring at least ``score / 2`` with IoU at
    least ``iou`` (matched greedily, best IoU first, each used once)."""
    (boxes, labels, scores), (e_boxes, e_labels, e_scores) = got, expected
    wanted = e_scores >= score
    e_boxes, e_labels = e_boxes[wanted], e_labels[wanted]
    kept = scores >= score / 2
    boxes, labels = boxes[kept], labels[kept]
    if len(e_boxes) == 0 or len(boxes) == 0:
        return 0, len(e_boxes)
    overlap = box_iou(e_boxes.float(), boxes.float())
    overlap[e_labels[:, None] != labels[None, :]] = 0
    found = 0
    for row in overlap:
        best = int(row.argmax())
        if row[best] >= iou:
            found += 1
            overlap[:, best] = 0
    return found, len(e_boxes)
