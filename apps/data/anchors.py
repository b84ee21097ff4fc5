"""The anchor part of `visiondet data check`: box sizes and aspect ratios, how well a detector's anchors
cover them (best possible recall), and anchors fitted to them (detection/anchor_fit.py does the work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apps.config import ConfigError, build_experiment, load_yaml_with_bases
from detection.anchor_fit import AnchorReport, anchor_report, coco_boxes
from detection.generation import generation_of
from detection.models import DetectorConfig
from vision.data.cocofile import paused_gc

__all__ = ["detector_config", "anchor_check", "format_anchor_report", "anchor_report_dict"]

_QUANTILES = ("min", "5%", "25%", "50%", "75%", "95%", "max")


def detector_config(config: str | None) -> tuple[DetectorConfig, str]:
    """The model config of a detection experiment file, or the default Faster R-CNN's; and its name."""
    if config is None:
        default = DetectorConfig()
        return default, (f"no --config: the default Faster R-CNN ({default.arch} at min_size "
                         f"{default.min_size}), not yours unless you train that")
    exp = build_experiment(load_yaml_with_bases(config))  # (its data paths need not exist here)
    if not isinstance(exp.model, DetectorConfig):
        raise ConfigError(f"{config}: task {exp.task!r} has no anchors (a detection config is needed)")
    if not generation_of(exp.model.arch).learned_proposals:
        raise ConfigError(f"{config}: {exp.model.arch} has no anchors (its proposals come from outside the "
                          "network; anchors belong to faster_rcnn_* archs)")
    return exp.model, config


def anchor_check(annotations: str | Path, config: str | None) -> AnchorReport | None:
    """The anchor report of a COCO file's boxes for ``config``'s detector; None without boxes."""
    cfg, _ = detector_config(config)
    with open(annotations, encoding="utf-8") as f, paused_gc():  # 2.5x faster at COCO scale: see paused_gc
        boxes, image_hw = coco_boxes(json.load(f))
    if not len(boxes):
        return None
    return anchor_report(cfg, boxes, image_hw)


def _recall(values: dict[float, float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values.values())


def format_anchor_report(report: AnchorReport, source: str, command: str | None = None) -> str:
    """The text section (about 20 lines). ``command``: the check as it was run, when it had no --config;
    the report then ends with the same command for the user's own model."""
    sizes = "/".join(str(s) for s in report.min_size)
    lines = [f"anchors: {report.num_boxes} boxes; detector: {source}",
             f"  box sizes in px, as annotated and as the RPN sees them (min_size {sizes}, "
             f"max_size {report.max_size}):",
             "    " + f"{'':24}" + "".join(f"{q:>8}" for q in _QUANTILES)]
    for where, summary in (("annotated", report.sizes_in_file), ("model input", report.sizes_in_model)):
        for name, values in summary.items():
            if name == "height/width" and where == "model input":
                continue  # (the resize keeps the aspect ratio)
            label = f"{name} ({where})" if name != "height/width" else name
            digits = 2 if name == "height/width" else 1
            lines.append("    " + f"{label:24}" + "".join(f"{v:8.{digits}f}" for v in values))
    placement = ("best possible recall at IoU 0.5 / 0.7: grid = anchors where the RPN puts them (its feature "
                 "grid on the padded image), centred = on each box (an upper bound)")
    lines.append(f"  {placement}")
    for name, layout, grid, centred in (
        ("configured", report.configured, report.configured_grid, report.configured_centred),
        ("fitted", report.fitted, report.fitted_grid, report.fitted_centred),
    ):
        lines.append(f"    {name:11}grid {_recall(grid)}   centred {_recall(centred)}   "
                     f"sizes {layout.sizes} ratios {layout.ratios}")
    only = " for the default Faster R-CNN only" if command else ""
    lines.append(f"  suggested{only}: model.rpn.anchor_sizes={report.fitted.sizes} "
                 f"model.rpn.aspect_ratios={report.fitted.ratios}")
    lines.append("  (or model.rpn.anchor_sizes: auto and aspect_ratios: auto: fitted when training starts)")
    if command:  # sizes depend on the model's resize: the default's would break a small-image detector
        lines.append(f"  for your model's anchors and sizes: {command} --config YOUR_CONFIG.yaml")
    return "\n".join(lines)


def anchor_report_dict(report: AnchorReport, source: str) -> dict[str, Any]:
    """The same for --json (recall keys are the IoU thresholds as strings)."""
    recall = lambda r: {str(k): v for k, v in r.items()}  # noqa: E731
    return {
        "source": source, "boxes": report.num_boxes, "min_size": report.min_size, "max_size": report.max_size,
        "quantiles": list(_QUANTILES), "sizes_annotated": report.sizes_in_file,
        "sizes_model_input": report.sizes_in_model,
        "configured": {"anchor_sizes": report.configured.sizes, "aspect_ratios": report.configured.ratios,
                       "recall_grid": recall(report.configured_grid),
                       "recall_centred": recall(report.configured_centred)},
        "fitted": {"anchor_sizes": report.fitted.sizes, "aspect_ratios": report.fitted.ratios,
                   "recall_grid": recall(report.fitted_grid),
                   "recall_centred": recall(report.fitted_centred)},
    }
