"""Export a model to ONNX or TorchScript, checked: the file is run on sample inputs of several sizes and
compared with the PyTorch module it came from; beyond tolerance the export fails and leaves no file.

A ``GraphSpec`` says what to trace (a module taking and returning tensors), the input and output names,
which axes are dynamic, the samples to check on and the metadata to store: ONNX ``metadata_props`` (key
``visiondet``, JSON) or a TorchScript extra file ``visiondet.json``. ``load_runner`` opens either kind of
file and runs it on tensors. onnx and onnxruntime are optional (``pip install 'visiondet[export]'``).

The ONNX export uses the TorchScript-based exporter (``dynamo=False``): torch 2.14's default dynamo
exporter needs the onnxscript package, and the traced graphs here export at opset 17 (ONNX Runtime
1.32 runs them; torchvision's RoIAlign symbolic needs >= 16).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17
METADATA_KEY = "visiondet"
EXTRA_FILE = "visiondet.json"
INSTALL_HINT = "pip install 'visiondet[export]'  (onnx==1.23.2 onnxruntime==1.32.0)"

# A comparison returns None when the outputs agree, else one line saying how they differ.
Compare = Callable[[Sequence[Tensor], Sequence[Tensor]], str | None]


class ExportError(RuntimeError):
    """An export that cannot be done or whose file does not compute what PyTorch does."""


def require_onnxruntime() -> Any:
    """The onnxruntime module, or an ExportError saying which pip command installs it."""
    try:
        import onnx  # noqa: F401  (the exporter needs it too)
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"ONNX export and the onnxruntime backend need onnx and onnxruntime "
                          f"({exc.name} is missing): {INSTALL_HINT}") from None
    return onnxruntime


def compare_dense(atol: float = 1e-4, rtol: float = 1e-4) -> Compare:
    """Every output of the same shape and within ``atol + rtol * |expected|``; integer outputs equal
    except where the float outputs they derive from are within tolerance of a tie (argmax masks: the
    share of differing pixels may be at most 1e-3)."""

    def compare(got: Sequence[Tensor], expected: Sequence[Tensor]) -> str | None:
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            if g.shape != e.shape:
                return f"output {i}: shape {tuple(g.shape)} instead of {tuple(e.shape)}"
            if e.is_floating_point():
                err = (g.float() - e.float()).abs()
                bad = err > atol + rtol * e.float().abs()
                if bad.any():
                    return (f"output {i}: max abs difference {float(err.max()):.3g} "
                            f"(tolerance {atol} + {rtol}*|x|)")
            else:
                share = float((g != e).float().mean()) if e.numel() else 0.0
                if share > 1e-3:
                    return f"output {i}: {share:.2%} of the values differ"
        return None

    return compare


def some_detections(outputs: list[tuple[Tensor, ...]]) -> str | None:
    """``GraphSpec.informative`` of detectors: at least one detection (boxes first) over the check images."""
    if any(len(out[0]) for out in outputs):
        return None
    return (f"PyTorch finds no detection on any of the {len(outputs)} check images (boxes that are not there "
            "cannot be compared)")


def compare_detections(box_atol: float = 0.05, score_atol: float = 1e-3, edge_atol: float = 2e-3) -> Compare:
    """(boxes [D, 4], labels [D], scores [D]): the same detections, each with the same label, its box within
    ``box_atol`` pixels and its score within ``score_atol``. Matched one to one rather than by position:
    detections whose scores tie within float rounding may come out in either order. The defaults allow
    what different kernels (ONNX Runtime's MLAS against oneDNN) give a random-weight ResNet-50 FPN at 800 px,
    whose activations magnify rounding: up to 0.017 px and 3.3e-4 in score. A detection scoring
    within ``edge_atol`` of the lowest score either side kept may be on one side only: at the score
    threshold or the per-image cap, float rounding decides whether it is in."""

    def compare(got: Sequence[Tensor], expected: Sequence[Tensor]) -> str | None:
        (boxes, labels, scores), (e_boxes, e_labels, e_scores) = got, expected
        if len(boxes) == 0 or len(e_boxes) == 0:
            same = len(boxes) == len(e_boxes)
            return None if same else f"{len(boxes)} detections instead of {len(e_boxes)}"
        edge = min(float(scores.min()), float(e_scores.min())) + edge_atol
        unmatched = list(range(len(e_boxes)))
        for i in range(len(boxes)):
            close = [j for j in unmatched if int(labels[i]) == int(e_labels[j])
                     and abs(float(scores[i]) - float(e_scores[j])) <= score_atol
                     and float((boxes[i].float() - e_boxes[j].float()).abs().max()) <= box_atol]
            if close:
                unmatched.remove(close[0])
            elif float(scores[i]) > edge:
                return (f"detection {i} (label {int(labels[i])}, score {float(scores[i]):.4f}, box "
                        f"{[round(v, 1) for v in boxes[i].tolist()]}) has no PyTorch counterpart within "
                        f"{box_atol} px and {score_atol} in score")
        missing = [j for j in unmatched if float(e_scores[j]) > edge]
        if missing:
            return (f"{len(missing)} PyTorch detections are missing (the best scores "
                    f"{float(e_scores[missing[0]]):.4f})")
        return None

    return compare


@dataclass
class GraphSpec:
    """What to export: ``module(*sample) -> tuple of tensors`` for every sample (the first one is traced)."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    samples: list[tuple[Tensor, ...]]
    compare: Compare
    metadata: dict[str, Any] = field(default_factory=dict)
    # what PyTorch's outputs over all samples must show for the check to mean something (None when they do,
    # else why not), e.g. detectors: at least one detection, or files that find nothing would pass
    informative: Callable[[list[tuple[Tensor, ...]]], str | None] | None = None


@dataclass
class ExportReport:
    path: Path
    format: str
    seconds: float
    checks: list[str]  # one line per sample: its input shapes and what was compared


def _shapes(sample: Sequence[Tensor]) -> str:
    return ", ".join("x".join(str(d) for d in t.shape) for t in sample)


def export_graph(spec: GraphSpec, out: str | os.PathLike, fmt: str) -> ExportReport:
    """Trace ``spec.module`` into ``out`` as ``fmt`` (onnx or torchscript), then run the file on every
    sample and compare with the module; raise ExportError (and remove the file) when they differ."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnxruntime()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # per process: torchrun ranks may export at once
    module = spec.module.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about every Python bool/int it meets; the checks below are what count
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                _write_onnx(spec, tmp)
            else:
                traced = torch.jit.trace(module, spec.samples[0], check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(spec.metadata)})
        seconds = time.perf_counter() - start
        runner = load_runner(tmp, fmt=fmt)
        checks, outputs_seen = [], []
        for i, sample in enumerate(spec.samples):
            with torch.no_grad():
                expected = spec.module(*sample)
            expected = (expected,) if isinstance(expected, Tensor) else tuple(expected)
            outputs_seen.append(expected)
            got = runner(*sample)
            reason = spec.compare(got, expected)
            if reason is not None:
                raise ExportError(f"{out}: the exported {fmt} model differs from PyTorch on check input {i} "
                                  f"({_shapes(sample)}): {reason}; no file written")
            outputs = ", ".join(_shapes([t]) for t in expected)
            checks.append(f"input {_shapes(sample)}: outputs {outputs} match")
        reason = spec.informative(outputs_seen) if spec.informative is not None else None
        if reason is not None:
            raise ExportError(f"{out}: the {fmt} check compared nothing: {reason}; no file written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, fmt, seconds, checks)


def _write_onnx(spec: GraphSpec, path: Path) -> None:
    import onnx

    torch.onnx.export(
        spec.module, spec.samples[0], str(path), input_names=spec.input_names,
        output_names=spec.output_names, dynamic_axes=spec.dynamic_axes, opset_version=OPSET, dynamo=False,
    )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(spec.metadata)
    onnx.save(model, str(path))


# ---- running exported files -------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``visiondet`` metadata of an exported file (ONNX or TorchScript); {} when it has none."""
    path = Path(path)
    if _format_of(path) == "onnx":
        require_onnxruntime()
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for entry in model.metadata_props:
            if entry.key == METADATA_KEY:
                return json.loads(entry.value)
        return {}
    files = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[EXTRA_FILE]) if files[EXTRA_FILE] else {}


def _format_of(path: Path, fmt: str | None = None) -> str:
    if fmt is not None:
        return fmt
    with path.open("rb") as f:
        head = f.read(4)
    return "torchscript" if head.startswith(b"PK") else "onnx"


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options: every graph optimisation, as many intra-op threads as torch uses
    (ORT's default is one per core, which oversubscribes a machine that also runs torch)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return options


class Runner:
    """An exported file as a callable: ``runner(*tensors) -> list of CPU tensors`` (inputs in the order
    the file declares them; ``metadata`` is what export stored)."""

    def __init__(self, path: str | os.PathLike, *, fmt: str | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such exported model file")
        self.format = _format_of(self.path, fmt)
        if self.format == "onnx":
            ort = require_onnxruntime()
            try:
                self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                    providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                reason = str(exc).splitlines()[0]
                raise ExportError(f"{self.path}: ONNX Runtime cannot load it: {reason}") from None
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.module = None
        else:
            with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location="cpu")
            self.input_names = []
        self.metadata = read_metadata(self.path) if self.format == "torchscript" else self._onnx_metadata()

    def _onnx_metadata(self) -> dict[str, Any]:
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        return json.loads(raw) if raw else {}

    def __call__(self, *inputs: Tensor) -> list[Tensor]:
        if self.module is not None:
            with torch.no_grad():
                out = self.module(*inputs)
            return list(out) if isinstance(out, tuple | list) else [out]
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, inputs,
                                                                               strict=True)}
        return [torch.from_numpy(a) for a in self.session.run(None, feed)]


def load_runner(path: str | os.PathLike, *, fmt: str | None = None, threads: int | None = None) -> Runner:
    return Runner(path, fmt=fmt, threads=threads)


# ---- classification and segmentation graphs ---------------------------------------------------------------


def sample_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[Tensor]:
    """Deterministic check images [3, h, w] in [0, 1]: a colour gradient with a few flat rectangles and
    discs, so that a trained model finds edges and shapes in them (noise gives most models nothing to say)."""
    gen = torch.Generator().manual_seed(seed)
    images = []
    for h, w in sizes:
        ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
        xs = torch.linspace(0, 1, w)[None, :].expand(h, w)
        image = torch.stack((ys, xs, 1 - (xs + ys) / 2)) * 0.5 + 0.25
        for k in range(4):
            colour = torch.rand(3, 1, 1, generator=gen)
            cy, cx = float(torch.rand((), generator=gen)) * h, float(torch.rand((), generator=gen)) * w
            r = (0.1 + 0.15 * float(torch.rand((), generator=gen))) * min(h, w)
            if k % 2:
                inside = ((ys * (h - 1) - cy).abs() < r) & ((xs * (w - 1) - cx).abs() < r)
            else:
                inside = (ys * (h - 1) - cy) ** 2 + (xs * (w - 1) - cx) ** 2 < r * r
            image = torch.where(inside, colour.expand(3, h, w), image)
        images.append(image.contiguous())
    return images
