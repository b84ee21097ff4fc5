"""Fast/Faster R-CNN as one traceable graph: an image [3, H, W] in [0, 1] (and, for Fast R-CNN, its
proposals [P, 4]) -> boxes [D, 4] xyxy in the image's pixels, labels [D] int64 in 1..K, scores [D].

``DetectorGraph`` is the detector's own forward on one image: normalisation, resize and pad, backbone,
proposals (the RPN with its anchors, or the given boxes), RoI heads and per-class NMS, and the boxes mapped
back, all the functions the eager model calls. They read every size from tensor shapes and never turn one
into a Python number on that path, so a trace keeps the sizes dynamic and the exported file takes any
image size. The graph adds only what export needs: one image in, the detections as three tensors out.
``vision.export`` checks after every export that the file gives the eager detector's detections on images
of several sizes.

What cannot be in the graph: selective search (OpenCV code on the CPU): Fast R-CNN graphs take the
proposals as a second input, and R-CNN (a CNN per warped region) is not exported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from detection.models import TwoStageDetector
from vision.export import ExportError, GraphSpec, compare_detections, sample_images, some_detections


class DetectorGraph(nn.Module):
    """One image through a TwoStageDetector in eval mode: its own forward, with tensors in and out.

    ``forward(image)`` for Faster R-CNN, ``forward(image, proposals)`` for Fast R-CNN (proposals [P, 4]
    xyxy in the image's pixels, P >= 1) -> (boxes [D, 4] float32, labels [D] int64, scores [D] float32).
    Thresholds are the detector's configured ones (``detector.thresholds``).
    """

    def __init__(self, detector: TwoStageDetector) -> None:
        super().__init__()
        if not detector.generation.exportable:
            raise ExportError(f"{detector.generation} is not exported: it warps every selective-search "
                              "region and runs the CNN once per region, with SVM scoring; use a Fast R-CNN "
                              "(proposals as an input) or a Faster R-CNN")
        self.detector = detector.eval()
        self.external = not detector.generation.learned_proposals

    def forward(self, image: Tensor, proposals: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if self.external and proposals is None:
            raise ValueError("this detector takes proposals [P, 4] as its second input")
        (detections,), _ = self.detector([image], proposals=[proposals] if self.external else None)
        return detections.boxes, detections.labels, detections.scores


def detector_spec(model: TwoStageDetector, metadata: dict[str, Any], *, num_proposals: int = 300,
                  images: list[Tensor] | None = None) -> GraphSpec:
    """The export spec of a Fast/Faster R-CNN: image [3, H, W] (and proposals [P, 4]) -> boxes, labels,
    scores, checked on three images of different sizes and shapes (or ``images``)."""
    graph = DetectorGraph(model)
    base = model.transform.min_size[-1]
    if images is None:
        sizes = [(base * 3 // 4, base), (base + 40, base * 2 // 3), (base // 2 + 7, base * 2 + 1)]
        images = sample_images(sizes)
    samples: list[tuple[Tensor, ...]] = []
    gen = torch.Generator().manual_seed(0)
    for image in images:
        if graph.external:
            h, w = image.shape[1:]
            xy = torch.rand(num_proposals, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
            wh = (torch.rand(num_proposals, 2, generator=gen) * 0.6 + 0.05) * torch.tensor([w, h])
            samples.append((image, torch.cat((xy, xy + wh), dim=1)))
        else:
            samples.append((image,))
    inputs = ["image", "proposals"] if graph.external else ["image"]
    axes = {"image": {1: "height", 2: "width"}, **({"proposals": {0: "proposals"}} if graph.external else {}),
            **{name: {0: "detections"} for name in ("boxes", "labels", "scores")}}
    return GraphSpec(graph, inputs, ["boxes", "labels", "scores"], axes, samples, compare_detections(),
                     metadata, informative=some_detections)
