"""The three R-CNN generations and what each can do: the one place an architecture name is read.

Code that must behave differently for Faster R-CNN, Fast R-CNN or R-CNN asks a capability of the
detector's ``Generation`` (``generation_of(cfg.arch)``, or ``model.generation`` on a built detector),
never the arch string: adding a generation or a capability is then a change to this table alone.
``tests/test_generation.py`` fails on arch-prefix tests or generation-name strings anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Generation", "FASTER_RCNN", "FAST_RCNN", "RCNN", "GENERATIONS", "generation_of"]


@dataclass(frozen=True)
class Generation:
    """One generation of the R-CNN family, by what it can do.

    prefix: how its arch names start (``faster_rcnn_r50_fpn``: ``faster_rcnn``); title: its name in prose;
    learned_proposals: an RPN makes the proposals from anchors (else they come from outside: selective
    search, a file, or the caller); features_per_region: the CNN runs on every warped region (else once per
    image, and regions are pooled from its maps); later_stages: training continues after the gradient-descent
    loop (R-CNN's SVMs and box regressors); exportable: the detector traces to one ONNX / TorchScript graph;
    newness: 0 for the newest (the demo lists detectors newest first).
    """

    prefix: str
    title: str
    learned_proposals: bool
    features_per_region: bool
    later_stages: bool
    exportable: bool
    newness: int

    def __str__(self) -> str:
        return self.title


FASTER_RCNN = Generation("faster_rcnn", "Faster R-CNN", learned_proposals=True, features_per_region=False,
                         later_stages=False, exportable=True, newness=0)
FAST_RCNN = Generation("fast_rcnn", "Fast R-CNN", learned_proposals=False, features_per_region=False,
                       later_stages=False, exportable=True, newness=1)
RCNN = Generation("rcnn", "R-CNN", learned_proposals=False, features_per_region=True, later_stages=True,
                  exportable=False, newness=2)
GENERATIONS = (FASTER_RCNN, FAST_RCNN, RCNN)


def generation_of(arch: str) -> Generation:
    """The generation an arch name belongs to (``<prefix>_<body>``); ValueError for none. Whether the body
    exists is ``detection.models.split_arch``'s question."""
    for generation in GENERATIONS:
        if arch.startswith(generation.prefix + "_"):
            return generation
    prefixes = ", ".join(f"{g.prefix}_*" for g in GENERATIONS)
    raise ValueError(f"unknown detector arch {arch!r}: detector archs are {prefixes}")
