"""The line ``visiondet train`` prints when a run leaves the scale its recipe was measured at.

A recipe's choices (optimiser, precision, sizes, ...) were picked by studies at some time budgets and on a
training set of some size: the recipe's ``tested:`` block (configs/detection/faster_rcnn_r18_fpn_cpu.yaml).
Under the shortest budget tested, or on a training set much smaller or larger, those choices are guesses:
the line says so and quotes what the studies found, from the recipe's own block: nothing is invented here.
"""

from __future__ import annotations

from apps.experiment import Experiment, TestedScale, parse_duration

__all__ = ["FAR", "untested_scale"]

FAR = 4.0  # a training set this many times smaller or larger than the studies' is "much" so


def untested_scale(exp: Experiment, train_images: int) -> str | None:
    """One line when ``exp``'s time budget is under its recipe's tested budgets, or its ``train_images`` are
    FAR times fewer or more than the studies had; None inside that scale or without a ``tested:`` block."""
    tested: TestedScale | None = exp.tested
    if tested is None or not tested.findings:
        return None
    reasons = []
    if exp.train.time_budget is not None and tested.budgets:
        shortest = min(tested.budgets, key=lambda b: parse_duration(b, "tested.budgets"))
        if parse_duration(exp.train.time_budget, "train.time_budget") < parse_duration(shortest):
            reasons.append(f"a time budget of {exp.train.time_budget}, under the {shortest} this recipe was "
                           "tested at")
    if tested.train_images:
        ratio = train_images / tested.train_images
        if ratio < 1 / FAR or ratio > FAR:
            reasons.append(f"{train_images} training images against the studies' {tested.train_images}")
    if not reasons:
        return None
    where = f" ({tested.source})" if tested.source else ""
    budgets = ", ".join(tested.budgets) or "no fixed budget"
    return (f"untested scale: {' and '.join(reasons)}. The studies behind this recipe ({budgets}, "
            f"{tested.train_images or '?'} training images{where}) found: " + "; ".join(tested.findings))
