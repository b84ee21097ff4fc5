"""``train.time_budget`` during a run: the schedule laid over the steps that fit, re-laid as the run goes.

:class:`~apps.engine.schedule.TimeBudget` does the arithmetic; :class:`RunBudget` feeds it the times the
run measures (optimizer steps, evaluations, checkpoint saves), keeps every process at the same planned end
(rank 0's clock decides), and says what it plans: in the log, and on the progress line as the plan's epochs
and the time left in the budget (:meth:`RunBudget.view`).
"""

from __future__ import annotations

from collections.abc import Callable

from apps.engine import distributed as dist_utils
from apps.engine.logging import BudgetView, RunLogger
from apps.engine.schedule import LrPlan, TimeBudget

__all__ = ["RunBudget", "duration"]

# until the first steps are timed: no end in sight, so no decay yet and the full warm-up
_UNPLANNED = 1 << 40


def duration(seconds: float) -> str:
    """``754.2`` -> ``12m34s`` (log lines of the time budget)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class RunBudget:
    """The time budget of one run. Every process calls the same methods at the same points of the loop."""

    def __init__(self, seconds: float, *, lr_plan: LrPlan, steps_per_epoch: int, eval_every: int,
                 eval_batches: int, log: RunLogger, world_size: int, is_main: bool,
                 clock: Callable[[], float]) -> None:
        self.budget = TimeBudget(seconds, steps_per_epoch=steps_per_epoch, eval_every=eval_every,
                                 eval_batches=eval_batches)
        self.lr_plan, self.steps_per_epoch, self.log, self.clock = lr_plan, steps_per_epoch, log, clock
        self.world_size, self.is_main = world_size, is_main
        self.tick_at, self.ticked_step, self.laid = 0.0, 0, False

    def start(self, step: int, saved: dict[str, float] | None) -> None:
        """Start (or, with ``saved`` from last.pt, continue) measuring at optimizer step ``step``."""
        b = self.budget
        if saved:
            b.load_state_dict(saved)
            self.lr_plan.total_steps = int(saved["total_steps"])
        else:
            self.lr_plan.total_steps = _UNPLANNED
        now = self.clock()
        b.start(now)
        self.tick_at, self.ticked_step = now, step
        self.laid = b.step_s is not None  # (a resumed run's plan was logged before)
        self.log.info(f"time budget {duration(b.seconds)}"
                      + (f" ({duration(b.elapsed(now))} used before this resume)" if saved else "")
                      + ": the schedule is laid over the steps that fit once the first ones are timed")

    # ---- measuring ----------------------------------------------------------------------------------------

    def epoch_started(self) -> None:
        self.tick_at = self.clock()

    def tick(self, step: int) -> bool:
        """After each batch: time the optimizer step just taken (if one was), re-lay the schedule over the
        steps that fit the time left, and say whether the run has reached that end."""
        if step == self.ticked_step:
            return False
        now = self.clock()
        self.budget.add_step(now - self.tick_at)
        self.tick_at, self.ticked_step = now, step
        total = self.relay(step, now)
        if total is None:
            return False
        b = self.budget
        if not self.laid:
            self.laid = True
            self.log.info(f"time budget: {b.step_s:.3g} s per step, {b.eval_s:.3g} s per evaluation "
                          f"({'measured' if b.eval_count else 'estimated'}): {total} optimizer steps "
                          f"({total / self.steps_per_epoch:.1f} epochs), warm-up {self.lr_plan.warmup_steps}")
            if line := self.lr_plan.warmup_warning():  # not a warning: no config can know the steps that fit
                self.log.info(line)
        if total == step and b.seconds - b.elapsed(now) < b.eval_s + 2 * b.save_s:
            self.log.warning(f"time budget {duration(b.seconds)}: no room left after step {step} "
                             f"(a step takes {b.step_s:.3g} s, an evaluation about {b.eval_s:.3g} s): the "
                             "run ends now, with its final evaluation, and may pass the budget")
        return step >= total

    def evaluated(self, seconds: float, step: int, *, last: bool) -> None:
        """An evaluation took ``seconds``: reserve that much for every one left and plan again."""
        self.budget.add_eval(seconds)
        if not last and self.relay(step, self.clock(), epoch_end_done=True) is not None:
            left = self.budget.seconds - self.budget.elapsed(self.clock())
            self.log.info(f"time budget: {duration(left)} left, {self.lr_plan.total_steps} optimizer "
                          f"steps planned ({step} done)")

    def saved(self, seconds: float) -> None:
        self.budget.add_save(seconds)

    def relay(self, step: int, now: float, *, epoch_end_done: bool = False) -> int | None:
        """Lay the schedule over the steps that fit the time left (None: the speed is not measured yet)."""
        total = self.budget.plan(step, now, epoch_end_done=epoch_end_done) if self.is_main else None
        if self.world_size > 1:  # every rank must stop at the same step: rank 0's clock decides
            total = dist_utils.broadcast_object(total)
        if total is not None:
            self.lr_plan.total_steps = total
        return total

    # ---- what the run reports -----------------------------------------------------------------------------

    def done(self, step: int) -> bool:
        return step >= self.lr_plan.total_steps

    def view(self) -> BudgetView:
        """The plan's epochs (e.g. 5.1) and the time left, for the progress line."""
        epochs = self.lr_plan.total_steps / self.steps_per_epoch if self.laid else None
        return BudgetView(epochs, self.budget.seconds - self.budget.elapsed(self.clock()))

    def state(self) -> dict[str, float]:
        """For last.pt: elapsed time, speed measurements and the planned total steps."""
        return {**self.budget.state_dict(self.clock()), "total_steps": self.lr_plan.total_steps}

    def summary(self, step: int) -> str:
        return (f"time budget: {duration(self.budget.elapsed(self.clock()))} of "
                f"{duration(self.budget.seconds)} used, {step} optimizer steps")
