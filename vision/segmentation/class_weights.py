"""Class weights for the segmentation loss, from the pixel counts of the training masks.

Cross-entropy averaged over the pixels lets the classes that cover most pixels set the gradient: on the
real-imagery set the background and the large objects are learned while 25 px faces and 8 px digits are
never painted. Weighting each pixel by its class makes every class count; ENet (Paszke et al., 2016,
sec. 5.2) weights class c by ``1 / ln(c0 + p_c)``, ``p_c`` its share of the labelled pixels and
``c0 = 1.02``: about 1.4 for a class that covered every pixel and at most 1 / ln(1.02), about 50, for one
that covers none, so a class rare in the counts cannot make the loss explode (median frequency balancing,
SegNet's rule, has no such bound). Whether it pays is the data's question: on the real-imagery set, in
one 20-minute run, it lowered mIoU from 0.320 to 0.235 (README, "Segmentation loss for rare classes").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vision.segmentation.metrics import IGNORE_INDEX

__all__ = ["ENET_C0", "MAX_MASKS", "enet_weights", "fit_class_weights", "pixel_shares"]

ENET_C0 = 1.02
MAX_MASKS = 2000  # shares are statistics: 2,000 masks spread over a larger set estimate them well enough


def pixel_shares(label_maps: Iterable[np.ndarray], num_labels: int) -> np.ndarray:
    """Each label's share of the labelled pixels of ``label_maps`` (``[num_labels]``, summing to 1;
    ``IGNORE_INDEX`` pixels are not counted). A value outside 0..num_labels-1 is an error."""
    counts = np.zeros(num_labels, np.int64)
    for label_map in label_maps:
        values = np.asarray(label_map).ravel()
        values = values[values != IGNORE_INDEX]
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(f"label {int(values.max())} outside 0..{num_labels - 1} (and not "
                             f"{IGNORE_INDEX}, ignore)")
        counts += np.bincount(values, minlength=num_labels)
    total = counts.sum()
    if not total:
        raise ValueError("the masks hold no labelled pixel (all are ignore)")
    return counts / total


def enet_weights(shares: np.ndarray, c0: float = ENET_C0) -> np.ndarray:
    """ENet's class weights ``1 / ln(c0 + share)`` for the pixel ``shares`` of :func:`pixel_shares`."""
    return 1.0 / np.log(c0 + np.asarray(shares, np.float64))


def fit_class_weights(dataset: Any, names: Sequence[str], max_masks: int = MAX_MASKS
                      ) -> tuple[tuple[float, ...], str]:
    """ENet's weights for the labels 0..K (``names``: background first) from the masks of ``dataset``
    (anything with ``len`` and ``index_map(i)``, the label map before transforms), at most ``max_masks`` of
    them evenly spread; a mask that cannot be read is skipped and counted. Returns the weights and one line
    saying what they came from. A ValueError when no mask holds a labelled pixel."""
    picked = sorted({round(float(i)) for i in np.linspace(0, len(dataset) - 1, min(len(dataset), max_masks))})
    unreadable: list[str] = []

    def maps() -> Iterable[np.ndarray]:
        for index in picked:
            try:
                yield dataset.index_map(index)
            except (ValueError, OSError) as exc:  # ImageError, AnnotationError, a vanished file
                unreadable.append(str(exc))

    shares = pixel_shares(maps(), len(names))
    weights = tuple(round(float(w), 4) for w in enet_weights(shares))
    parts = ", ".join(f"{name} {w:.2f} ({share:.3f})" for name, w, share in zip(names, weights, shares,
                                                                                  strict=True))
    line = (f"class weights fitted to {len(picked) - len(unreadable)} of {len(dataset)} training masks "
            f"(ENet's 1 / ln({ENET_C0} + pixel share)): {parts}")
    if unreadable:
        line += f"; {len(unreadable)} unreadable masks skipped (first: {unreadable[0]})"
    return weights, line
