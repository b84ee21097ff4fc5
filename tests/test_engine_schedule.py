"""The schedule as a function of progress, the warm-up cap, and time-budgeted training under a fake clock.

The fake clock advances 1 s per training batch and 3 s per evaluation, and nowhere else, so the run's
timeline is exact and the planned number of steps can be worked out by hand (see test_a_budget_run...).
"""

from __future__ import annotations

import json
import math

import pytest
from support.engine import Interrupt, budget_config

from apps.config import ConfigError, TrainConfig, build_experiment, parse_duration
from apps.engine.schedule import LrPlan, TimeBudget, fitted_warmup, lr_factor, plan_total_steps
from apps.engine.trainer import train
from vision.checkpoint import load_checkpoint


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5m", 90), ("2H", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value, reason", [(600, "no unit"), ("20 minutes", "cannot read"), ("0m", "longer"),
                                           ("", "cannot read"), ("m", "cannot read")])
def test_bad_durations_say_why(value, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_duration(value, "train.time_budget")


def test_the_warm_up_is_at_most_a_tenth_of_the_run():
    assert fitted_warmup(100, 2000) == 100 and fitted_warmup(100, 200) == 20 and fitted_warmup(100, 9) == 0
    cfg = TrainConfig(epochs=2, scheduler="constant", warmup_iters=100, warmup_factor=0.0)
    plan = LrPlan(cfg, steps_per_epoch=100)  # 200 steps: warm-up 20
    assert plan.warmup_steps == 20
    assert [plan(s) for s in (0, 10, 20, 100)] == [0.0, 0.5, 1.0, 1.0]
    assert plan.warmup_warning() == ("train.warmup_iters=100 is more than a tenth of this run's 200 "
                                     "optimizer steps: warm-up shortened to 20 steps")
    assert LrPlan(cfg, steps_per_epoch=500).warmup_warning() is None  # 1000 steps: 100 fits


def test_the_schedule_follows_the_progress_fraction():
    cfg = TrainConfig(epochs=10, scheduler="cosine", min_lr_ratio=0.1)
    # the same progress gives the same lr whatever the length; re-laying moves the decay with it
    assert lr_factor(50, cfg, 10, total_steps=100) == pytest.approx(0.55)
    assert lr_factor(150, cfg, 10, total_steps=300) == pytest.approx(0.55)
    assert lr_factor(300, cfg, 10, total_steps=300) == pytest.approx(0.1)
    # epoch positions are fractions of train.epochs: milestone 5 of 10 is half way through any length
    steps = TrainConfig(epochs=10, scheduler="multistep", milestones=[5], gamma=0.1)
    assert lr_factor(149, steps, 10, total_steps=300) == 1.0
    assert lr_factor(150, steps, 10, total_steps=300) == 0.1


def test_planning_steps_with_evaluations_by_hand():
    # 1 s a step, 10 steps an epoch, 5 s per evaluation after every epoch and at the end, saves free:
    # ending at 65 costs 65 + 6 evaluations (steps 10..60) * 5 + the final 5 = 100; ending at 66 costs 101
    plan = dict(step=0, steps_per_epoch=10, step_s=1.0, eval_every=1, eval_s=5.0, save_s=0.0)
    assert plan_total_steps(remaining_s=100, **plan) == 65
    assert plan_total_steps(remaining_s=99.9, **plan) == 64
    # evaluations every 2 epochs (at 20, 40, 60) and 0.5 s per save (every epoch end, and 2 at the end):
    # 70 + 3 * 5 + 6 * 0.5 + 5 + 1 = 94, and 71 adds an epoch end at 70 (+ 1.5 s): 96.5 > 95
    assert plan_total_steps(remaining_s=95, **{**plan, "eval_every": 2, "save_s": 0.5}) == 70
    # just after step 30, its epoch end still ahead: 60 steps + evaluations at 30..80 (6 * 5) + 5 = 95 s;
    # a 91st step adds one at 90: 101 s
    assert plan_total_steps(remaining_s=95, **{**plan, "step": 30}) == 90
    assert plan_total_steps(remaining_s=3, **{**plan, "step": 30}) == 30  # no time left: stop now


def test_the_budget_times_steps_after_the_first_and_estimates_evaluations():
    budget = TimeBudget(100.0, steps_per_epoch=10, eval_batches=4, min_steps=2)
    budget.start(0.0)
    budget.add_step(9.0)  # the first step of a process pays for lazy set-up: not a measurement
    budget.add_step(1.0)
    assert budget.plan(2, now=10.0) is None  # one measured step is not enough
    budget.add_step(2.0)
    assert budget.step_s == 1.5 and budget.eval_s == 3.0  # 4 batches at about half a training step each
    budget.add_eval(3.0)
    assert budget.eval_s == 3.0
    state = budget.state_dict(now=12.0)
    again = TimeBudget(100.0, steps_per_epoch=10, eval_batches=4)
    again.load_state_dict(state)
    again.start(500.0)
    assert again.elapsed(505.0) == 17.0 and again.step_s == 1.5 and again.eval_s == 3.0


def lr_by_step(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}


def test_a_budget_run_ends_at_its_budget_with_a_decayed_lr_and_survives_resume(tmp_path, clock):
    # 60 s less the 2 % margin = 58.8 s. Once the first evaluation is timed (3 s) the plan is 32 steps:
    # 32 steps + evaluations at the 7 epoch ends 4..28 + the final one = 32 + 8 * 3 = 56 s; a 33rd step
    # would add an epoch end at 32: 33 + 9 * 3 = 60 > 58.8. train.epochs=1 is ignored under a budget.
    result = train(build_experiment(budget_config(tmp_path, "whole")))
    folder = tmp_path / "whole"
    last = load_checkpoint(folder / "last.pt")
    state = last["train_state"]
    assert state["step"] == 32 and state["time_budget"]["total_steps"] == 32
    assert state["time_budget"]["elapsed"] == pytest.approx(56.0) and clock.now == pytest.approx(1056.0)
    assert result.epochs_done == 8 and (folder / "best.pt").is_file() and last["metrics"]["accuracy"] >= 0
    lrs = lr_by_step(folder)
    assert lrs[32] == pytest.approx(0.1 * 0.1)  # fully decayed: lr * min_lr_ratio after the last step
    assert max(lrs.values()) > 0.09 and all(lrs[s + 1] <= lrs[s] + 1e-12 for s in range(8, 32))
    log = (folder / "train.log").read_text()
    # laid at step 3, before any evaluation was timed (estimated 1 s): 46 steps, warm-up 4
    assert "warm-up shortened to 4 steps" in log and log.count("warm-up shortened") == 1
    assert "time budget: 53s left, 32 optimizer steps planned (4 done)" in log
    val_steps = [json.loads(r)["step"] for r in (folder / "metrics.jsonl").read_text().splitlines()
                 if json.loads(r)["kind"] == "val"]
    assert val_steps == [4, 8, 12, 16, 20, 24, 28, 32]

    # the same run interrupted before its 14th batch (last.pt at step 13) and resumed in a new "process"
    clock.batches, clock.interrupt_at, clock.now = 0, 14, 1000.0
    cfg = budget_config(tmp_path, "split")
    with pytest.raises(Interrupt):
        train(build_experiment(cfg))
    saved = load_checkpoint(tmp_path / "split" / "last.pt")["train_state"]
    assert saved["step"] == 13 and saved["time_budget"]["elapsed"] == pytest.approx(13 + 3 * 3)
    clock.batches, clock.interrupt_at, clock.now = 0, None, 5000.0  # the pause does not count
    train(build_experiment({**cfg, "resume": True}))
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")["train_state"]
    assert resumed["step"] == 32 and resumed["time_budget"]["elapsed"] == pytest.approx(56.0)
    assert lr_by_step(tmp_path / "split") == pytest.approx(lrs)


def test_a_budget_without_validation_still_ends_decayed(tmp_path, clock):
    cfg = budget_config(tmp_path, "noval")
    cfg["data"]["val"] = None
    cfg["train"].update(time_budget="20s", scheduler="poly", power=1.0, min_lr_ratio=0.0)
    train(build_experiment(cfg))
    state = load_checkpoint(tmp_path / "noval" / "last.pt")["train_state"]
    # 19.6 s usable, saves free: 19 steps of 1 s
    assert state["step"] == 19 and state["time_budget"]["elapsed"] == pytest.approx(19.0)
    assert lr_by_step(tmp_path / "noval")[19] == pytest.approx(0.0)


def test_a_fixed_run_warns_once_when_its_warm_up_is_too_long(tmp_path, clock):
    cfg = budget_config(tmp_path, "fixed")
    cfg["train"].update(time_budget=None, epochs=5, scheduler="constant", warmup_factor=0.0)
    train(build_experiment(cfg))
    log = (tmp_path / "fixed" / "train.log").read_text()
    assert log.count("warm-up shortened to 2 steps") == 1  # 5 epochs x 4 steps = 20
    lrs = lr_by_step(tmp_path / "fixed")
    assert lrs[1] == pytest.approx(0.05) and lrs[2] == pytest.approx(0.1) and math.isclose(lrs[20], 0.1)


def test_a_budget_too_short_for_its_final_evaluation_says_so(tmp_path, clock):
    cfg = budget_config(tmp_path, "short")
    # timed after 3 steps (3 s): 0.5 s left, less than an evaluation (estimated 1 s: 2 batches at half a step)
    cfg["train"]["time_budget"] = "3.5s"
    train(build_experiment(cfg))
    state = load_checkpoint(tmp_path / "short" / "last.pt")["train_state"]
    assert state["step"] == 3 and state["time_budget"]["elapsed"] == pytest.approx(6.0)  # 3 steps + 3 s
    log = (tmp_path / "short" / "train.log").read_text()
    assert log.count("no room left after step 3") == 1 and "may pass the budget" in log


def test_a_budget_shortens_its_warm_up_without_a_warning(tmp_path, clock):
    # no config can know how many steps a budget fits (the shipped tour config asks for 100 warm-up steps
    # in about 400): the shortened warm-up is said once, as information, never as a warning on every run
    train(build_experiment(budget_config(tmp_path, "quiet")))
    lines = (tmp_path / "quiet" / "train.log").read_text().splitlines()
    said = [line for line in lines if "warm-up shortened" in line]
    assert len(said) == 1 and " INFO " in said[0]
    assert not [line for line in lines if "WARNING" in line and "warm" in line]


def test_the_progress_line_of_a_budget_shows_the_plan_s_epochs_and_the_budget_left(tmp_path, clock):
    # the fake clock: 1 s a batch, 3 s an evaluation. The plan is laid at step 3 (46 steps: 11.5 epochs of
    # 4 steps) and after the first evaluation (32 steps: 8.0 epochs); until step 3 nothing is planned yet
    train(build_experiment(budget_config(tmp_path, "progress")))
    log = (tmp_path / "progress" / "train.log").read_text()
    lines = [line.split(" INFO ", 1)[1] for line in log.splitlines() if " it " in line]
    assert lines[0].startswith("epoch 1/?  it 1/4  ") and lines[0].endswith("  budget left 0:00:59")
    assert lines[3].startswith("epoch 1/11.5  it 4/4  ") and lines[3].endswith("  budget left 0:00:56")
    # epoch 2's first batch: 4 batches, an evaluation and this batch spent (8 s)
    assert lines[4].startswith("epoch 2/8.0  it 1/4  ") and lines[4].endswith("  budget left 0:00:52")
    assert lines[-1].startswith("epoch 8/8.0  it 4/4  ") and not [line for line in lines if " eta " in line]


def test_the_progress_line_of_a_fixed_run_shows_its_epochs_and_eta(tmp_path, clock):
    cfg = budget_config(tmp_path, "fixed")
    cfg["train"].update(time_budget=None, epochs=3)
    train(build_experiment(cfg))
    lines = [line for line in (tmp_path / "fixed" / "train.log").read_text().splitlines() if " it " in line]
    assert len(lines) == 12 and all(" eta " in line and "budget" not in line for line in lines)
    assert " epoch 3/3  it 4/4  " in lines[-1]
