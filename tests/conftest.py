"""Fixtures the test files share. The helpers behind them live in tests/support/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import detectors, engine

import apps.engine.trainer
from apps.tasks import TASKS
from detection.models import TwoStageDetector


@pytest.fixture(scope="session")
def tiny_detector() -> Callable[..., TwoStageDetector]:
    """The factory ``tiny_detector(arch, *, seed=0, **config)``: a small random-weight detector of any arch
    (support/detectors.py says which fields it sets); session-wide, so module fixtures may use it."""
    return detectors.tiny_detector


@pytest.fixture(scope="session")
def tiny_detector_checkpoint() -> Callable[[Path], Path]:
    """The factory ``tiny_detector_checkpoint(path) -> path``: writes a tiny Faster R-CNN checkpoint there."""
    return detectors.tiny_detector_checkpoint


@pytest.fixture
def clock(monkeypatch) -> engine.FakeClock:
    """The toy task under a fake clock that advances 1 s per training batch and 3 s per evaluation, and
    nowhere else (``interrupt_at``: the batch that raises ``Interrupt``)."""
    monkeypatch.setitem(TASKS, "toy", "support.engine:ToyTask")
    engine.register_toy_task()
    fake = engine.FakeClock()
    monkeypatch.setattr(apps.engine.trainer, "clock", fake)
    move_batch, evaluate = engine.ToyTask.move_batch, engine.ToyTask.evaluate
    fake.batches, fake.interrupt_at = 0, None

    def timed_move_batch(self, batch, device):
        fake.batches += 1
        if fake.batches == fake.interrupt_at:
            raise engine.Interrupt
        fake.now += 1.0
        return move_batch(self, batch, device)

    def timed_evaluate(self, *args):
        fake.now += 3.0
        return evaluate(self, *args)

    monkeypatch.setattr(engine.ToyTask, "move_batch", timed_move_batch)
    monkeypatch.setattr(engine.ToyTask, "evaluate", timed_evaluate)
    return fake
