"""Fast/Faster R-CNN as one traceable graph: an image [3, H, W] in [0, 1] (and, for Fast R-CNN, its
proposals [P, 4]) -> boxes [D, 4] xyxy in the image's pixels, labels [D] int64 in 1..K, scores [D].

The detector's own forward keeps image sizes as Python ints (it batches images of different sizes and
reads like the paper); a trace would freeze those ints into constants and the exported file would only
work at the size it was traced with. ``DetectorGraph`` runs the same parts (normalisation, backbone, RPN
head, anchors, box coder, RoI pooler, box head, predictor) on one image with every size taken from tensor
shapes, so that ONNX / TorchScript files accept any image size. ``vision.export`` checks after every
export that the file gives the eager detector's detections on images of several sizes.

What cannot be in the graph: selective search (OpenCV code on the CPU): Fast R-CNN graphs take the
proposals as a second input, and R-CNN (a CNN per warped region) is not exported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, remove_small_boxes

from detection.models import ExternalProposals, TwoStageDetector
from detection.rpn import RegionProposalNetwork, flatten_predictions
from vision.export import ExportError, GraphSpec, compare_detections, sample_images


def _clip(boxes: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Boxes [..., 4] clipped to an image whose size is given as 0-d tensors (traced, not constants)."""
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width.to(boxes.dtype))
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height.to(boxes.dtype))
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


class DetectorGraph(nn.Module):
    """One image through a TwoStageDetector in eval mode, sizes from tensors (see the module docstring).

    ``forward(image)`` for Faster R-CNN, ``forward(image, proposals)`` for Fast R-CNN (proposals [P, 4]
    xyxy in the image's pixels, P >= 1) -> (boxes [D, 4] float32, labels [D] int64, scores [D] float32).
    Thresholds are the detector's at construction (``roi_heads.score_thresh``, ``nms_thresh``).
    """

    def __init__(self, detector: TwoStageDetector) -> None:
        super().__init__()
        self.detector = detector.eval()
        if not detector.generation.exportable:
            raise ExportError("R-CNN is not exported: it warps every selective-search region and runs "
                              "the CNN once per region, with SVM scoring; use a Fast R-CNN (proposals as an "
                              "input) or a Faster R-CNN")
        self.external = isinstance(detector.proposal_generator, ExternalProposals)
        if not self.external and not isinstance(detector.proposal_generator, RegionProposalNetwork):
            raise TypeError(f"no graph for proposal source {type(detector.proposal_generator).__name__}")

    def forward(self, image: Tensor, proposals: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        det = self.detector
        transform = det.transform
        original = torch._shape_as_tensor(image)[1:]  # (H, W) int64, a Shape op once traced
        x, size = self.resize(transform.normalize(image), original)
        x = self.pad(x, size)
        features = det.backbone(x[None])
        if self.external:
            if proposals is None:
                raise ValueError("this detector takes proposals [P, 4] as its second input")
            boxes = self.external_proposals(proposals, original, size)
        else:
            boxes = self.rpn_proposals(features, torch._shape_as_tensor(x)[1:], size)
        heads = det.roi_heads
        # The pooler reads image sizes only to infer level scales, which RoIPooler fixes at construction.
        class_logits, box_deltas = heads.predict(features, [boxes], [(1, 1)])
        decoded = heads.box_coder.decode(box_deltas, boxes).reshape(box_deltas.shape[0], -1, 4)
        scores = F.softmax(class_logits, dim=-1)[:, : decoded.shape[1]]
        boxes, labels, scores = self.select(decoded[:, 1:], scores[:, 1:], size)
        # back to the input's pixels: the same float32 ratios as detection.transform.scale_boxes
        ratio = original.to(torch.float32) / size.to(torch.float32)
        return boxes * torch.stack((ratio[1], ratio[0], ratio[1], ratio[0])), labels, scores

    def resize(self, image: Tensor, original: Tensor) -> tuple[Tensor, Tensor]:
        """DetectionTransform.resize at test time: the scale in float64 as Python computes it, the output
        size floor(side * scale), bilinear sampling on that size (recompute_scale_factor's grid)."""
        transform = self.detector.transform
        sides = original.to(torch.float64)
        # One 1-D float64 division: the ONNX exporter turns a Python number (or a 0-d tensor) divided by a
        # float64 tensor into float32 arithmetic, and floor(500 * 0.32) became 159 instead of 160.
        limits = sides.new_tensor([float(transform.min_size[-1]), float(transform.max_size)])
        scale = (limits / torch.stack((sides.min(), sides.max()))).min()
        size = torch.floor(sides * scale).to(torch.int64)
        out = F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)
        return out[0], size

    def pad(self, image: Tensor, size: Tensor) -> Tensor:
        """Zero padding at the bottom and right up to a multiple of ``size_divisible``."""
        div = self.detector.transform.size_divisible
        padded = torch.div(size + (div - 1), div, rounding_mode="floor") * div
        extra = padded - size
        return F.pad(image, (0, extra[1], 0, extra[0]))

    def rpn_proposals(self, features: dict[str, Tensor], padded: Tensor, size: Tensor) -> Tensor:
        """RegionProposalNetwork.select_proposals for one image, anchors built from traced map sizes."""
        rpn = self.detector.proposal_generator
        maps = [features[name] for name in rpn.in_features]
        objectness_maps, delta_maps = rpn.head(maps)
        pre_n, post_n = rpn.pre_nms_top_n[False], rpn.post_nms_top_n[False]
        boxes, scores, levels = [], [], []
        for level, (feature, obj, deltas) in enumerate(zip(maps, objectness_maps, delta_maps, strict=True)):
            obj, deltas = flatten_predictions(obj, deltas)
            anchors = self.grid_anchors(level, padded, torch._shape_as_tensor(feature)[2:])
            k = torch.clamp(torch._shape_as_tensor(obj)[1], max=pre_n)
            idx = obj[0].topk(k).indices
            boxes.append(rpn.box_coder.decode(deltas[0, idx], anchors[idx]))
            scores.append(torch.sigmoid(obj[0, idx]))
            levels.append(torch.full_like(idx, level))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        boxes = _clip(boxes, size[0], size[1])
        keep = remove_small_boxes(boxes, rpn.min_box_size)
        keep = keep[scores[keep] >= rpn.score_thresh]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, rpn.nms_thresh)[:post_n]
        return boxes[keep]

    def grid_anchors(self, level: int, padded: Tensor, grid: Tensor) -> Tensor:
        """AnchorGenerator._grid_anchors with the grid and stride as tensors: [H_l * W_l * A, 4]."""
        generator = self.detector.proposal_generator.anchor_generator
        stride = torch.div(padded, grid, rounding_mode="floor").to(torch.float32)
        ys = torch.arange(grid[0], dtype=torch.float32) * stride[0]
        xs = torch.arange(grid[1], dtype=torch.float32) * stride[1]
        ys, xs = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((xs, ys, xs, ys), dim=-1).reshape(-1, 1, 4)
        return (shifts + generator.cell_anchors(level)[None]).reshape(-1, 4)

    def external_proposals(self, proposals: Tensor, original: Tensor, size: Tensor) -> Tensor:
        """ExternalProposals on given boxes: scaled to the resized image, clipped, tiny ones dropped."""
        source = self.detector.proposal_generator
        ratio = size.to(torch.float32) / original.to(torch.float32)
        boxes = proposals.to(torch.float32) * torch.stack((ratio[1], ratio[0], ratio[1], ratio[0]))
        boxes = _clip(boxes, size[0], size[1])
        return boxes[remove_small_boxes(boxes, source.min_box_size)][: source.max_proposals]

    def select(self, boxes: Tensor, scores: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """roi_heads.detections_from_scores with a traced image size: boxes [P, K, 4], scores [P, K]."""
        heads = self.detector.roi_heads
        num_classes = scores.shape[1]
        boxes = _clip(boxes, size[0], size[1]).reshape(-1, 4)
        labels = torch.arange(1, num_classes + 1).expand(scores.shape[0], -1).reshape(-1)
        scores = scores.reshape(-1)
        keep = torch.where(scores > heads.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        return boxes[keep], labels[keep], scores[keep]


def detector_spec(model: TwoStageDetector, metadata: dict[str, Any], *, num_proposals: int = 300,
                  images: list[Tensor] | None = None) -> GraphSpec:
    """The export spec of a Fast/Faster R-CNN: image [3, H, W] (and proposals [P, 4]) -> boxes, labels,
    scores, checked on three images of different sizes and shapes (or ``images``). The graph is first
    checked to give the detector's own eager detections bit for bit."""
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
    with torch.no_grad():
        for i, sample in enumerate(samples):
            eager = model([sample[0]], proposals=[sample[1]] if graph.external else None)[0][0]
            traced = graph(*sample)
            same = all(torch.equal(a, b) for a, b in zip((eager.boxes, eager.labels, eager.scores), traced,
                                                         strict=True))
            if not same:
                shape = "x".join(map(str, sample[0].shape))
                raise ExportError(f"the export graph does not reproduce the detector on check image {i} "
                                  f"({shape}): a visiondet bug, please report it")
    inputs = ["image", "proposals"] if graph.external else ["image"]
    axes = {"image": {1: "height", 2: "width"}, **({"proposals": {0: "proposals"}} if graph.external else {}),
            **{name: {0: "detections"} for name in ("boxes", "labels", "scores")}}
    return GraphSpec(graph, inputs, ["boxes", "labels", "scores"], axes, samples, compare_detections(),
                     metadata)
