"""Learning-rate schedules and time-budgeted training.

The schedule is one function of the *progress fraction* ``t = step / total_steps``: an optional linear
warm-up multiplied by step, multi-step, cosine, polynomial, cyclical (triangular) or one-cycle decay. It is
applied through ``LambdaLR`` and stepped after every optimizer step. Because it depends on progress and not
on a fixed length, ``total_steps`` can be re-laid while training runs: that is what ``train.time_budget`` does
(:class:`TimeBudget` measures the run's speed and says how many steps fit). Epoch positions (milestones,
step_size, cycle_epochs) are fractions of ``train.epochs``: with a fixed number of epochs they fall exactly
where they always did; under a time budget they stretch or shrink with the budgeted length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from apps.experiment import TrainConfig

__all__ = ["ONECYCLE_START", "lr_factor", "fitted_warmup", "LrPlan", "build_scheduler", "plan_total_steps",
           "TimeBudget"]

# one-cycle's starting lr as a fraction of its peak: 1 / div_factor with torch's OneCycleLR default of 25
ONECYCLE_START = 1.0 / 25


def fitted_warmup(warmup_iters: int, total_steps: int) -> int:
    """The warm-up actually used: at most a tenth of the run, so that the decay has room to happen.

    A 100-step warm-up in a 200-step run would keep the lr under its peak for half the run and the
    cosine would start from a value it never reached.
    """
    return min(warmup_iters, total_steps // 10)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> float:
    """Multiplier of each group's base lr for optimizer step ``step`` (0-based), in ``(0, 1]`` mostly.

    ``total_steps`` defaults to ``epochs * steps_per_epoch``; ``t = step / total_steps`` and
    ``e = t * epochs`` (the position in planned epochs). step: ``gamma ** (e // step_size)``; multistep:
    ``gamma ** (#milestones <= e)``; cosine: ``m + (1 - m) * (1 + cos(pi * t)) / 2`` and poly:
    ``m + (1 - m) * (1 - t) ** power`` with ``m = min_lr_ratio``; cyclic: a triangle from ``m`` up to 1 and
    back every ``cycle_epochs`` (Smith, "Cyclical learning rates", 2017); onecycle: a cosine rise from
    ``ONECYCLE_START`` to 1 over the first ``pct_start`` of the run, then a cosine fall to ``m`` (Smith
    and Topin, "Super-convergence", 2018; torch's ``OneCycleLR`` annealing). Warm-up multiplies the first
    ``fitted_warmup(warmup_iters, total_steps)`` steps by a factor rising linearly from ``warmup_factor``
    to 1.
    """
    total = max(1, total_steps if total_steps is not None else cfg.epochs * steps_per_epoch)
    t = min(step / total, 1.0)
    # step * epochs / total is exact whenever it is a whole number (int / int rounds correctly), so the
    # decays of fixed-length runs land on exactly the step they always did
    e = step * cfg.epochs / total
    m = cfg.min_lr_ratio
    if cfg.scheduler == "constant":
        factor = 1.0
    elif cfg.scheduler == "step":
        factor = cfg.gamma ** math.floor(e / max(1, cfg.step_size))
    elif cfg.scheduler == "multistep":
        factor = cfg.gamma ** sum(e >= milestone for milestone in cfg.milestones)
    elif cfg.scheduler == "cosine":
        factor = m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif cfg.scheduler == "poly":
        factor = m + (1.0 - m) * (1.0 - t) ** cfg.power
    elif cfg.scheduler == "cyclic":
        period = max(2, round(cfg.cycle_epochs * total / max(1, cfg.epochs)))
        x = (step % period) / period
        factor = m + (1.0 - m) * (1.0 - abs(2.0 * x - 1.0))
    elif cfg.scheduler == "onecycle":
        p = cfg.pct_start
        if t < p:
            factor = ONECYCLE_START + (1.0 - ONECYCLE_START) * 0.5 * (1.0 - math.cos(math.pi * t / p))
        else:
            factor = m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * (t - p) / (1.0 - p)))
    else:
        raise ValueError(f"train.scheduler: unknown scheduler {cfg.scheduler!r}")
    warmup = fitted_warmup(cfg.warmup_iters, total)
    if step < warmup:
        alpha = step / warmup
        factor *= cfg.warmup_factor + (1.0 - cfg.warmup_factor) * alpha
    return factor


class LrPlan:
    """The schedule of one run: ``lr_factor`` over ``total_steps``, which a time budget may re-lay."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> None:
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.total_steps = total_steps if total_steps is not None else max(1, cfg.epochs * steps_per_epoch)

    @property
    def warmup_steps(self) -> int:
        return fitted_warmup(self.cfg.warmup_iters, self.total_steps)

    def warmup_warning(self) -> str | None:
        """One line when the configured warm-up was shortened to fit the run, else None."""
        if self.cfg.warmup_iters <= self.warmup_steps:
            return None
        return (f"train.warmup_iters={self.cfg.warmup_iters} is more than a tenth of this run's "
                f"{self.total_steps} optimizer steps: warm-up shortened to {self.warmup_steps} steps")

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.cfg, self.steps_per_epoch, self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig | LrPlan,
                    steps_per_epoch: int | None = None) -> LambdaLR:
    """A per-optimizer-step scheduler; call ``.step()`` after each ``optimizer.step()``.

    Pass an :class:`LrPlan` to re-lay the schedule later (its ``total_steps`` is read at every step), or a
    config and ``steps_per_epoch`` for a fixed length.
    """
    plan = cfg if isinstance(cfg, LrPlan) else LrPlan(cfg, int(steps_per_epoch or 1))
    # a closure, not the plan itself: LambdaLR.state_dict() would store a callable object's __dict__
    # (the config dataclass), which checkpoints loaded with weights_only=True cannot hold
    return LambdaLR(optimizer, lambda step: plan(step))


# ----------------------------------------------------------------------------------------------------------
# Time budget


def plan_total_steps(*, step: int, remaining_s: float, step_s: float, steps_per_epoch: int, eval_every: int,
                     eval_s: float, save_s: float, epoch_end_done: bool = False) -> int:
    """The most optimizer steps a run at ``step`` can reach inside ``remaining_s`` seconds.

    ``step`` is the step just taken: when it closes an epoch, that epoch's end is still ahead (unless
    ``epoch_end_done``: planning again right after its evaluation). Cost of
    ending at ``T``: ``(T - step) * step_s``, plus, at every epoch end ``k * steps_per_epoch`` in
    ``[step, T)``, a ``last.pt`` save and, every ``eval_every`` epochs, an evaluation; plus the final
    evaluation and two saves (best.pt, last.pt) at ``T``. Never less than ``step`` (no time left: stop now).
    """
    spe = max(1, steps_per_epoch)

    def cost(total: int) -> float:
        first = step // spe + 1 if epoch_end_done else max(1, -(-step // spe))
        last = (total - 1) // spe  # epoch ends k * spe with first <= k <= last (k * spe < total)
        ends = max(0, last - first + 1)
        evals = max(0, last // eval_every - (first - 1) // eval_every) if ends else 0
        return (total - step) * step_s + ends * save_s + evals * eval_s + eval_s + 2 * save_s

    if cost(step) > remaining_s or step_s <= 0:
        return step
    lo, hi = step, step + max(1, int(remaining_s / step_s) + 1)  # cost(hi) > remaining_s
    while hi - lo > 1:  # cost grows with total: bisect for the last total that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= remaining_s else (lo, mid)
    return lo


@dataclass
class TimeBudget:
    """Measures a run against ``seconds`` of wall-clock time and lays its total steps to fit.

    Times come from the caller (``now`` arguments), so tests drive it with a fake clock. ``elapsed_before``
    and the measured totals travel in ``last.pt`` (:meth:`state_dict`), so a resumed run keeps the
    remaining budget and its speed estimate. Until ``min_steps`` steps are measured the plan is None
    (the first step of a process, which pays for lazy initialisation, is never measured).
    """

    seconds: float
    steps_per_epoch: int
    eval_every: int = 1
    eval_batches: int = 0  # validation batches; 0: no evaluation
    margin: float = 0.02  # fraction of the budget kept for noise (the machine's speed varies)
    min_steps: int = 2
    elapsed_before: float = 0.0
    step_time: float = 0.0  # measured seconds and counts, over every process of the run
    step_count: int = 0
    eval_time: float = 0.0
    eval_count: int = 0
    save_time: float = 0.0
    save_count: int = 0
    started: float | None = None
    _skip_next: bool = True

    def start(self, now: float) -> None:
        self.started = now
        self._skip_next = True

    def elapsed(self, now: float) -> float:
        return self.elapsed_before + (now - self.started if self.started is not None else 0.0)

    def add_step(self, seconds: float) -> None:
        if self._skip_next:
            self._skip_next = False
            return
        self.step_time += seconds
        self.step_count += 1

    def add_eval(self, seconds: float) -> None:
        self.eval_time += seconds
        self.eval_count += 1

    def add_save(self, seconds: float) -> None:
        self.save_time += seconds
        self.save_count += 1

    @property
    def step_s(self) -> float | None:
        return self.step_time / self.step_count if self.step_count >= self.min_steps else None

    @property
    def eval_s(self) -> float:
        if not self.eval_batches:
            return 0.0
        if self.eval_count:
            return self.eval_time / self.eval_count
        # not measured yet: an evaluation batch is forward only, no backward: about half a training step
        return 0.5 * self.eval_batches * (self.step_s or 0.0)

    @property
    def save_s(self) -> float:
        return self.save_time / self.save_count if self.save_count else 0.0

    def plan(self, step: int, now: float, *, epoch_end_done: bool = False) -> int | None:
        """Total optimizer steps that fit, or None while the speed is not measured yet."""
        step_s = self.step_s
        if step_s is None:
            return None
        remaining = self.seconds * (1.0 - self.margin) - self.elapsed(now)
        return plan_total_steps(step=step, remaining_s=remaining, step_s=step_s,
                                steps_per_epoch=self.steps_per_epoch,
                                eval_every=self.eval_every if self.eval_batches else 1 << 30,
                                eval_s=self.eval_s, save_s=self.save_s, epoch_end_done=epoch_end_done)

    def state_dict(self, now: float) -> dict[str, float]:
        """Plain numbers for last.pt (loadable with weights_only=True)."""
        return {"seconds": self.seconds, "elapsed": self.elapsed(now), "step_time": self.step_time,
                "step_count": self.step_count, "eval_time": self.eval_time, "eval_count": self.eval_count,
                "save_time": self.save_time, "save_count": self.save_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue a run: its elapsed time and measurements (the budget itself is this run's config)."""
        self.elapsed_before = float(state["elapsed"])
        self.step_time, self.step_count = float(state["step_time"]), int(state["step_count"])
        self.eval_time, self.eval_count = float(state["eval_time"]), int(state["eval_count"])
        self.save_time, self.save_count = float(state["save_time"]), int(state["save_count"])
