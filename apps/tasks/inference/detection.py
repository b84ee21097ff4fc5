"""Detection at inference (Faster, Fast and R-CNN alike): the image as it is (the detector resizes and pads
inside and answers in the input's pixels), one image per forward, thresholds and a class filter per call."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_convert

from apps.tasks.inference.base import (
    Inference,
    ModelDescription,
    Result,
    Size,
    Transform,
    as_is,
    csv_head,
    rows_or_blank,
)
from detection.export import detector_spec
from detection.generation import generation_of
from detection.structures import Thresholds
from vision import visualize

__all__ = ["DetectionInference", "DetectionResult"]


@dataclass
class DetectionResult(Result):
    """Detections of one image. boxes: [D, 4] float32 xyxy original pixels; scores: [D] float32;
    labels: [D] int64 in 1..K; category_ids, names: the dataset's id and name of each label."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: list[int]
    names: list[str]
    image_size: Size
    # the highest score of a box under the score threshold (None: none there), so that an image without
    # detections can say whether a lower threshold would show some
    best_below: float | None = None

    csv_columns = ["file", "image_id", "width", "height", "category_id", "name", "score", "x", "y", "w", "h"]
    counts_key = "detections_per_class"

    def record(self) -> dict[str, Any]:
        """JSON-ready: COCO-style ``bbox`` [x, y, w, h] in pixels, score, category id and name."""
        dets = []
        xywh = box_convert_np(self.boxes).tolist()
        for (x, y, w, h), score, cid, name in zip(xywh, self.scores.tolist(), self.category_ids, self.names,
                                                  strict=True):
            bbox = [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]
            dets.append({"bbox": bbox, "score": round(score, 5), "category_id": cid, "name": name})
        return {"detections": dets}

    def draw(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """A copy of ``image`` with the boxes drawn, their coordinates multiplied by ``scale``."""
        if not len(self.labels):
            return image.copy()
        names = {int(label): name for label, name in zip(self.labels.tolist(), self.names, strict=True)}
        table = [names.get(k, str(k)) for k in range(int(self.labels.max()) + 1)]
        return visualize.draw_detections(image, self.boxes * scale, self.labels, self.scores, table)

    def quiet_best(self) -> float | None:
        return self.best_below if not len(self.labels) else None

    def scaled(self, scale: float, size: Size) -> DetectionResult:
        """Detections found on a copy resized by ``scale``, in the pixels of the original of ``size``."""
        if scale == 1.0:
            return self
        boxes = self.boxes / np.float32(scale)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, size[0])
        return dataclasses.replace(self, boxes=boxes.astype(np.float32), image_size=size)

    def best_first(self) -> list[dict[str, Any]]:
        """The record's detections, best score first."""
        return sorted(self.record()["detections"], key=lambda d: -d["score"])

    def table_rows(self) -> list[list[Any]]:
        """Rows ``class, score, x, y, w, h`` (pixels), best score first (the demo's table)."""
        return [[d["name"], round(d["score"], 3), *(round(v, 1) for v in d["bbox"])]
                for d in self.best_first()]

    @classmethod
    def csv_rows(cls, record: dict[str, Any]) -> Iterator[list[Any]]:
        head = csv_head(record)
        head.insert(1, record.get("image_id"))
        items = [[d["category_id"], d["name"], d["score"], *d["bbox"]] for d in record["detections"]]
        return rows_or_blank(head, items, len(cls.csv_columns))

    @classmethod
    def counted(cls, record: dict[str, Any]) -> list[str]:
        return [d["name"] for d in record["detections"]]


def box_convert_np(boxes: np.ndarray) -> np.ndarray:
    """xyxy -> xywh of a numpy [D, 4] array (torchvision's box_convert), in float64 so that widths are
    exactly ``x1 - x0`` of the float32 corners before rounding."""
    return box_convert(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xyxy", "xywh").numpy()


class DetectionInference(Inference):
    task = "detection"
    result_type = DetectionResult
    one_image_per_forward = True
    coco_results = True
    takes_thresholds = True

    def input_transform(self, preprocess: dict[str, Any]) -> Transform:
        return as_is

    def thresholds_for(self, model: Any) -> Thresholds | None:
        """This call's cuts for ``model``: its own score cut lowered to ours (the box head drops boxes under
        it before NMS, so a lower ``score_thresh`` needs it lowered too) and our NMS IoU. None for a model
        that takes none (an exported file: its cuts were fixed at export)."""
        defaults = getattr(model, "thresholds", None)
        if not isinstance(defaults, Thresholds):
            return None
        nms = defaults.nms_thresh if self.nms_thresh is None else self.nms_thresh
        return dataclasses.replace(defaults, score_thresh=min(defaults.score_thresh, self.score_thresh),
                                   nms_thresh=nms)

    def run(self, model: Any, inputs: list[Tensor], valid: list[Size], sizes: list[Size],
            stacked: Tensor | None, device: torch.device) -> list[Result]:
        to_model = lambda t: t.to(device, non_blocking=True).float().div_(255.0)  # noqa: E731
        thresholds = self.thresholds_for(model)
        per_call = {} if thresholds is None else {"thresholds": thresholds}
        # One image per forward: a detector pads the images of a batch to a common size, and both that
        # padding and batched kernels' rounding would make an image's boxes depend on its batch companions
        # (so on --batch-size, --workers, file order and --resume). Alone, it gets the same detections every
        # time; on a CPU this costs little (see README, predict speed).
        outputs = [model([to_model(t)], **per_call)[0][0] for t in inputs]
        return [self.result(d, v, s, nms_in_model=thresholds is not None)
                for d, v, s in zip(outputs, valid, sizes, strict=True)]

    def result(self, det: Any, valid: Size, size: Size, *, nms_in_model: bool = True) -> DetectionResult:
        """``det``: a ``detection.structures.Detections`` in the original pixels; boxes under the score
        threshold and of other classes dropped, and our NMS applied here when the model could not take it
        (``nms_in_model=False``: an exported file)."""
        keep = det.scores >= self.score_thresh
        if self.allowed is not None:
            allowed = self.allowed.to(det.labels.device)[det.labels]
            below, keep = det.scores[allowed & ~keep], keep & allowed
        else:
            below = det.scores[~keep]
        boxes, scores, labels = det.boxes[keep], det.scores[keep], det.labels[keep]
        if self.nms_thresh is not None and not nms_in_model:
            order = batched_nms(boxes.float(), scores.float(), labels, self.nms_thresh)
            boxes, scores, labels = boxes[order], scores[order], labels[order]
        names, ids = self.names_and_ids(labels.tolist())
        return DetectionResult(
            boxes=boxes.float().cpu().numpy(), scores=scores.float().cpu().numpy(),
            labels=labels.cpu().numpy(), category_ids=ids, names=names, image_size=size,
            best_below=float(below.max()) if len(below) else None,
        )

    @classmethod
    def describe(cls, model_cfg: dict[str, Any]) -> ModelDescription:
        # the three generations share one config (defaults as in DetectorConfig); the arch names one
        arch = str(model_cfg.get("arch", "?"))
        nms = float((model_cfg.get("roi") or {}).get("nms_thresh", 0.5))
        try:
            generation = generation_of(arch)
        except ValueError:  # (loading it will say what is wrong)
            return ModelDescription(arch, nms)
        return ModelDescription(arch, nms, generation.newness, has_anchors=generation.learned_proposals)

    @classmethod
    def export_spec(cls, loaded: Any, model: Any, metadata: dict[str, Any]) -> Any:
        t, cuts = model.transform, model.thresholds  # the configured cuts: the file keeps them fixed
        mean, std = t.mean.flatten().tolist(), t.std.flatten().tolist()
        metadata["preprocess"] = {
            "input": "one RGB image [3, H, W] float32 in [0, 1], any size",
            "inside": f"normalise (mean {mean}, std {std}), resize (short side {t.min_size[-1]}, long side "
                      f"at most {t.max_size}, bilinear), pad to a multiple of {t.size_divisible}; boxes come "
                      "back in the input's pixels", "size": loaded.preprocess.get("size")}
        metadata.update(score_thresh=cuts.score_thresh, nms_thresh=cuts.nms_thresh,
                        detections_per_img=cuts.detections_per_img, label_offset=1)
        spec = detector_spec(model, metadata)  # refuses R-CNN (a CNN run per warped region)
        if spec.module.external:
            metadata["proposals"] = ("input 'proposals' [P, 4] xyxy in the image's pixels (selective search "
                                     "is OpenCV code outside the graph)")
        return spec
