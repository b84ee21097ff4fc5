"""The one training loop, for every task (a task provides model, data and evaluator: apps/tasks/base.py).

Per optimizer step: ``accum_steps`` batches are run forward and backward (apps/engine/step.py: autocast,
DDP gradient sync on a window's last batch, non-finite losses dropped), then the optimizer step is taken.
``train.max_nonfinite`` non-finite losses in a row end the run with a checkpoint of the last good state.
After each epoch: evaluation, ``best.pt`` and early stopping (apps/engine/evaluation.py), ``last.pt``
(apps/engine/checkpointing.py). Under ``train.time_budget`` the run's length is the steps that fit
(apps/engine/budget.py). What the run reports is apps/engine/logging.py.

Resuming restores everything: weights, EMA, optimizer, scheduler, grad scaler, counters, every random
generator, and the position in the epoch's batch order (see apps/engine/loader.py). It is explicit: a run
folder (``resume=RUN_DIR``, or ``resume=true`` with ``output_dir``), continued with its own config.yaml,
which is never rewritten; other data, model or schedule need ``resume_force``. ``last.pt`` is also written
every ``train.checkpoint_minutes`` so that a long first epoch can be resumed.

A file that cannot be decoded ends the run with one line naming it (also the last line of train.log; a run
folder with no checkpoint yet is removed), or, with ``data.skip_unreadable``, is skipped and listed in
``skipped_images.txt``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apps.config import save_config
from apps.engine import checkpointing as ckpt_io
from apps.engine import distributed as dist_utils
from apps.engine.budget import RunBudget
from apps.engine.ema import ModelEMA
from apps.engine.evaluation import Validation
from apps.engine.loader import DataWarnings, SeededItems, UnreadableImageError, epoch_batches, make_loader
from apps.engine.logging import DataWait, RunLogger, TrainRecords, close_run, run_log
from apps.engine.optim import build_optimizer
from apps.engine.precision import autocast_dtype
from apps.engine.resume import find_resume_checkpoint, resume_changes
from apps.engine.schedule import LrPlan, build_scheduler
from apps.engine.step import Stepper, TrainingError
from apps.engine.tested import untested_scale
from apps.engine.unreadable import SkippedFiles, after_unreadable, unreadable_hint
from apps.experiment import Experiment, parse_duration
from apps.schema import ConfigError
from apps.tasks import get_task

__all__ = ["train", "TrainResult", "TrainingError"]

clock = time.monotonic  # the time budget's clock (tests replace it with a fake one)


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed", "early_stopped"
    epochs_done: int
    best_metric: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    skipped_images: int = 0  # unreadable files skipped (data.skip_unreadable), listed in skipped_images.txt


def train(exp: Experiment, *, runs_root: str | Path = "runs") -> TrainResult:
    """Train ``exp`` (resuming when ``exp.resume``); under torchrun, every process calls this."""
    created_group = not torch.distributed.is_initialized()
    deterministic = torch.are_deterministic_algorithms_enabled()
    info = dist_utils.init_distributed(exp.device)
    try:
        trainer = _Trainer(exp, info, Path(runs_root))
        result = trainer.run()
        dist_utils.barrier()  # leave the group together (see cleanup)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # a global switch: leave it as it was
        if created_group:
            dist_utils.cleanup()
    # later stages run in one process; with a process group the caller keeps open they could block on it
    if info.is_main and (created_group or info.world_size == 1):
        run_dir = result.run_dir
        final = trainer.task.finish_training(trainer.exp, run_dir, info.device, run_log(run_dir))
        result.metrics.update(final or {})
    return result


def _now() -> float:
    return clock()  # looked up at every call, so a test's replacement of ``clock`` is seen


class _Trainer:
    def __init__(self, exp: Experiment, info: dist_utils.DistInfo, runs_root: Path) -> None:
        self.exp, self.info, self.cfg = exp, info, exp.train
        self.task = task = get_task(exp.task)
        self.device = info.device
        resume_path = (find_resume_checkpoint(exp.resume, exp.output_dir, exp.task, runs_root)
                       if exp.resume else None)
        data = task.build_datasets(exp)  # bad data is an error before the run folder exists
        exp, fitted = task.fit_to_data(exp, data)  # e.g. anchors fitted to the training boxes

        def as_trained(e: Experiment) -> Experiment:  # model settings the data decides (num_classes)
            return replace(e, model=task.model_config_for(e.model, data.classes))

        exp = as_trained(exp)
        # a resumed run continues its config.yaml (as fitted): other data, model or schedule need resume_force
        forced = (resume_changes(resume_path.parent, exp, as_trained) if resume_path is not None
                  else [])
        self.run_dir = run_dir = ckpt_io.make_run_dir(exp, resume_path, runs_root, info)
        # what the run folder keeps (config.yaml, checkpoints): this run, as a fresh run would describe it
        self.exp = exp = replace(exp, output_dir=str(run_dir), resume=False, resume_force=False)
        self.log = log = RunLogger(run_dir if info.is_main else None)
        for line in fitted:
            log.info(line)
        ckpt_io.seed_everything(exp.seed + info.rank, deterministic=self.cfg.deterministic)

        self.train_ds, self.val_ds, self.classes = data.train, data.val, data.classes
        model = task.build_model(exp.model, self.classes, load_pretrained=resume_path is None)
        if self.cfg.unfreeze_at_epoch is not None and not hasattr(model, "unfreeze_backbone"):
            raise ConfigError(f"train.unfreeze_at_epoch: {type(model).__name__} has no unfreeze_backbone()")
        if exp.weights and resume_path is None:
            for line in ckpt_io.load_finetune_weights(model, exp.weights).lines():
                log.info(line)
        self.model = model.to(self.device)

        self.steps_per_epoch = math.ceil(len(self._batches(0)) / self.cfg.accum_steps)
        optimizer = build_optimizer(self.model, self.cfg)
        self.lr_plan = LrPlan(self.cfg, self.steps_per_epoch)  # a time budget re-lays its total steps
        scheduler = build_scheduler(optimizer, self.lr_plan)
        amp_dtype = autocast_dtype(self.cfg, self.device, log)
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.ema = ModelEMA(self.model, self.cfg.ema_decay) if self.cfg.ema else None
        self.stepper = Stepper(self.model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               ema=self.ema, amp_dtype=amp_dtype, accum_steps=self.cfg.accum_steps,
                               grad_clip=self.cfg.grad_clip, device=self.device, world_size=info.world_size,
                               log=log)
        self.items = SeededItems(self.train_ds, exp.seed, skip_unreadable=exp.data.skip_unreadable)
        self.skipped = SkippedFiles(run_dir, log.warning)
        self.data_warnings = DataWarnings()  # warnings while reading items: one line per pattern and pass

        self.at = ckpt_io.Counters()
        self.budget: RunBudget | None = None
        self.checkpoints = ckpt_io.RunCheckpoints(
            run_dir, exp=exp, model_cfg=exp.model, classes=self.classes, preprocess=task.preprocess(exp),
            model=self.model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=self.ema,
            counters=self.at, info=info, checkpoint_every=self.cfg.checkpoint_every,
            checkpoint_minutes=self.cfg.checkpoint_minutes,
            budget_state=lambda: self.budget.state() if self.budget is not None else None)
        self.validation = None if self.val_ds is None else Validation(
            task, self.val_ds, models=[("", self.model)] + ([("ema_", self.ema.module)] if self.ema else []),
            classes=self.classes, device=self.device, patience=self.cfg.patience, counters=self.at,
            checkpoints=self.checkpoints, log=log, world_size=info.world_size,
            loader_args=dict(batch_size=self.cfg.batch_size, workers=exp.data.workers,
                             pin_memory=self.device.type == "cuda", skip_unreadable=exp.data.skip_unreadable,
                             hint=unreadable_hint(exp.data.val), on_skip=self.skipped,
                             data_warnings=self.data_warnings))
        self.records = TrainRecords(log, data=exp.data, device=self.device, world_size=info.world_size,
                                    log_every=self.cfg.log_every)
        self.nonfinite_run, self.unfrozen = 0, False
        rng, self.resumed_budget = (self.checkpoints.restore(resume_path, log.info, log.warning)
                                    if resume_path is not None else (None, None))
        self.stepper.ddp = self._wrap()
        if info.is_main:
            if resume_path is None:  # a resumed run keeps the config.yaml it was started with
                save_config(exp, run_dir / "config.yaml")
            for change in forced:
                log.warning(f"resume_force: {change} (config.yaml keeps the saved value)")
            log.info(f"run folder: {run_dir}")
            log.info(f"{exp.task}: {len(self.train_ds)} training images, "
                     f"{len(self.val_ds) if self.val_ds is not None else 0} validation images, "
                     f"{len(self.classes)} classes, device {self.device}, {info.world_size} process(es)")
            if line := untested_scale(exp, len(self.train_ds)):
                log.info(line)
        if rng is not None:  # last: nothing after this may consume randomness the original run did not
            ckpt_io.restore_rng(rng)

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        status, failure = "completed", None
        self.budget = self._start_budget()
        if self.budget is None and (line := self.lr_plan.warmup_warning()):
            self.log.warning(line)
        try:
            epoch = self.at.epoch
            while not self._schedule_done(epoch):
                self.at.epoch = epoch
                self._maybe_unfreeze(epoch)
                if self.budget is not None:
                    self.budget.epoch_started()
                self._train_epoch(epoch)
                self.at.epoch, self.at.batch_in_epoch = epoch + 1, 0
                stop = self._end_of_epoch(epoch)
                saving = _now()
                self.checkpoints.save_last()
                if self.budget is not None:  # the budget reserves this much for every save left
                    self.budget.saved(_now() - saving)
                if stop:
                    status = "early_stopped"
                    break
                epoch += 1
            if self.budget is not None:
                self.log.info(self.budget.summary(self.at.step))
        except UnreadableImageError as exc:
            failure = exc
        finally:
            close_run(self.log, self.run_dir, self.info.is_main)
        if failure is not None:
            # one line, not a worker traceback
            raise after_unreadable(failure, self.run_dir, self.info.is_main) from None
        return TrainResult(self.run_dir, status, self.at.epoch, self.at.best, dict(self.at.metrics),
                           skipped_images=len(self.skipped.read()))  # (every rank's)

    def _train_epoch(self, epoch: int) -> None:
        at, accum, data = self.at, self.cfg.accum_steps, self.exp.data
        batches, start = self._batches(epoch), at.batch_in_epoch
        self.items.epoch = epoch
        loader = DataWait(make_loader(self.items, batches[start:], self.task.collate, workers=data.workers,
                                      pin_memory=self.device.type == "cuda", seed=self.exp.seed + epoch,
                                      on_skip=self.skipped, hint=unreadable_hint(data.train),
                                      data_warnings=self.data_warnings))
        progress = self.log.progress(epoch=epoch, epochs=self.cfg.epochs, total=len(batches), start=start,
                                     log_every=self.cfg.log_every, data_wait=loader,
                                     budget=self.budget.view if self.budget is not None else None)
        self.records.start(loader)
        self.stepper.ddp.train()
        window = 0  # batches whose gradients wait for the next optimizer step
        try:
            for i, (indices, batch) in enumerate(loader, start):
                images, targets = self.task.move_batch(batch, self.device)
                closes_window = (i + 1) % accum == 0 or i + 1 == len(batches)
                result = self.stepper.forward_backward(images, targets, sync=closes_window)
                if result.finite:
                    self.nonfinite_run, window = 0, window + 1
                    self.records.add(result.losses)
                else:
                    self._nonfinite(result.losses, indices, i)
                    self.stepper.drop_window()  # this window's partial gradients
                    window = 0
                at.batch_in_epoch = i + 1
                if closes_window and window > 0:
                    if self.stepper.step(at.step):
                        at.step += 1
                        if at.step % self.cfg.log_every == 0:
                            self.records.write(step=at.step, epoch=epoch, lr=self.stepper.lr,
                                               grad_scale=self.stepper.grad_scale())
                        if self.checkpoints.due() and i + 1 < len(batches):  # (epoch end saves)
                            self.checkpoints.save_last()
                    window = 0
                progress.update(1, {"loss": float(result.loss.detach()), "lr": self.stepper.lr})
                if self.budget is not None and self.budget.tick(at.step):  # the budget may end mid-epoch
                    break
        finally:
            progress.close()
        for line in self.data_warnings.lines():  # this process's share, one line per pattern
            self.log.warning(f"epoch {epoch + 1}: {line}")

    def _end_of_epoch(self, epoch: int) -> bool:
        """Evaluate every ``eval_every`` epochs and at the run's end; True to stop early."""
        if self.validation is None:
            return False
        last = self._schedule_done(epoch + 1)
        if (epoch + 1) % self.cfg.eval_every and not last:
            return False
        where = (f"/{self.cfg.epochs}" if self.budget is None
                 else f" (step {self.at.step}/{self.lr_plan.total_steps})")
        started = _now()
        stop = self.validation.run(epoch, where)
        if self.budget is not None:  # the time budget reserves this much for every evaluation left
            self.budget.evaluated(_now() - started, self.at.step, last=last)
        return stop

    # ---- helpers -----------------------------------------------------------------------------------------

    def _schedule_done(self, epoch: int) -> bool:
        """Whether the run has reached its end: ``train.epochs``, or the steps its time budget fits."""
        return epoch >= self.cfg.epochs if self.budget is None else self.budget.done(self.at.step)

    def _start_budget(self) -> RunBudget | None:
        if self.cfg.time_budget is None:
            return None
        per_rank = self.cfg.batch_size * self.info.world_size
        budget = RunBudget(parse_duration(self.cfg.time_budget, "train.time_budget"), lr_plan=self.lr_plan,
                           steps_per_epoch=self.steps_per_epoch, eval_every=self.cfg.eval_every,
                           eval_batches=math.ceil(len(self.val_ds) / per_rank) if self.val_ds else 0,
                           log=self.log, world_size=self.info.world_size, is_main=self.info.is_main,
                           clock=_now)
        budget.start(self.at.step, self.resumed_budget)
        return budget

    def _batches(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.task, self.train_ds, batch_size=self.cfg.batch_size, seed=self.exp.seed,
                                epoch=epoch, rank=self.info.rank, world=self.info.world_size)
        if self.info.world_size > 1:  # grouped batching can give ranks different counts; DDP needs equal
            n = torch.tensor([len(batches)], device=self.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            batches = batches[: int(n.item())]
        if not batches:
            raise ConfigError(f"data.train: {len(self.train_ds)} images give no batch of train.batch_size="
                              f"{self.cfg.batch_size} on {self.info.world_size} process(es)")
        return batches

    def _wrap(self) -> nn.Module:
        if self.info.world_size == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids,
                                       find_unused_parameters=self.task.find_unused_parameters)

    def _maybe_unfreeze(self, epoch: int) -> None:
        at = self.cfg.unfreeze_at_epoch
        if at is None or epoch < at or self.unfrozen:
            return
        self.model.unfreeze_backbone()
        self.unfrozen = True
        if self.info.world_size > 1:  # DDP fixes its parameter set when wrapping: wrap again
            self.stepper.ddp = self._wrap()
        self.log.info(f"epoch {epoch + 1}: backbone unfrozen (fine-tuning all layers)")

    def _nonfinite(self, losses: dict[str, torch.Tensor], indices: list[int], i: int) -> None:
        self.nonfinite_run += 1
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()] or ["(on another rank)"]
        names = self.task.sample_names(self.train_ds, indices)
        self.log.warning(f"non-finite loss {', '.join(bad)} at epoch {self.at.epoch + 1}, batch {i + 1}, "
                         f"step {self.at.step}, lr {self.stepper.lr:.4g}; images: {', '.join(names)}; step "
                         f"skipped ({self.nonfinite_run} in a row)")
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            self.at.batch_in_epoch = i + 1
            self.checkpoints.save_last()
            raise TrainingError(f"{self.nonfinite_run} non-finite losses in a row ({', '.join(bad)}): stop. "
                                f"The last good state is in {self.run_dir / 'last.pt'}. Lower train.lr, "
                                "add warm-up (train.warmup_iters) or gradient clipping (train.grad_clip), "
                                "or check the images named above.")
