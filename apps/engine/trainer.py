"""The one training loop, for every task (a task provides model, data and evaluator: apps/tasks/base.py).

Per optimizer step: ``accum_steps`` batches are run forward (under autocast when ``train.amp``: the
``train.amp_dtype`` on CUDA or the CPU; float16 adds a gradient scaler, whose overflowing steps are
skipped) and backward (DDP synchronises gradients on the last one only), then the gradients are
unscaled, clipped, applied, the learning rate advances and the EMA follows. A non-finite loss drops its
batch's gradients with a warning; ``train.max_nonfinite`` of them in a row end the run with a checkpoint of
the last good state. After each epoch: evaluation, ``last.pt``, ``best.pt`` on a better primary metric,
early stopping.

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

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apps.config import ConfigError, Experiment, parse_duration, resolve_output_dir, save_config
from apps.engine import checkpointing as ckpt_io
from apps.engine import distributed as dist_utils
from apps.engine.ema import ModelEMA
from apps.engine.loader import (
    DataWarnings,
    SeededItems,
    Unreadable,
    UnreadableImageError,
    epoch_batches,
    eval_loader,
    make_loader,
)
from apps.engine.logging import DataWait, RunLogger, plot_curves, run_log
from apps.engine.optim import build_optimizer
from apps.engine.schedule import LrPlan, TimeBudget, build_scheduler
from apps.tasks import get_task
from vision.checkpoint import load_checkpoint

__all__ = ["train", "TrainResult", "TrainingError"]

clock = time.monotonic  # the time budget's clock (tests replace it with a fake one)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); a checkpoint of the last good state exists."""


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


class _Trainer:
    def __init__(self, exp: Experiment, info: dist_utils.DistInfo, runs_root: Path) -> None:
        self.exp, self.info, self.cfg = exp, info, exp.train
        self.task = get_task(exp.task)
        self.device = info.device
        resume_path = (ckpt_io.find_resume_checkpoint(exp.resume, exp.output_dir, exp.task, runs_root)
                       if exp.resume else None)
        data = self.task.build_datasets(exp)  # bad data is an error before the run folder exists
        exp, fitted = self.task.fit_to_data(exp, data)  # e.g. anchors fitted to the training boxes

        def as_trained(e: Experiment) -> Experiment:  # model settings the data decides (num_classes)
            return replace(e, model=self.task.model_config_for(e.model, data.classes))

        exp = as_trained(exp)
        # a resumed run continues its config.yaml (as fitted): other data, model or schedule need resume_force
        forced = (ckpt_io.resume_changes(resume_path.parent, exp, as_trained) if resume_path is not None
                  else [])
        self.run_dir = self._make_run_dir(resume_path, runs_root)
        # what the run folder keeps (config.yaml, checkpoints): this run, as a fresh run would describe it
        self.exp = exp = replace(exp, output_dir=str(self.run_dir), resume=False, resume_force=False)
        self.log = RunLogger(self.run_dir if info.is_main else None)
        for line in fitted:
            self.log.info(line)
        ckpt_io.seed_everything(exp.seed + info.rank, deterministic=self.cfg.deterministic)

        self.train_ds, self.val_ds, self.classes = data.train, data.val, data.classes
        self.model_cfg = exp.model
        model = self.task.build_model(exp.model, self.classes, load_pretrained=resume_path is None)
        if self.cfg.unfreeze_at_epoch is not None and not hasattr(model, "unfreeze_backbone"):
            raise ConfigError(f"train.unfreeze_at_epoch: {type(model).__name__} has no unfreeze_backbone()")
        if exp.weights and resume_path is None:
            for line in ckpt_io.load_finetune_weights(model, exp.weights).lines():
                self.log.info(line)
        self.model = model.to(self.device)
        self.preprocess = self.task.preprocess(exp)

        self.batches_per_epoch = len(self._batches(0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.cfg.accum_steps)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.lr_plan = LrPlan(self.cfg, self.steps_per_epoch)  # a time budget re-lays its total steps
        self.scheduler = build_scheduler(self.optimizer, self.lr_plan)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(self.model, self.cfg.ema_decay) if self.cfg.ema else None
        self.items = SeededItems(self.train_ds, exp.seed, skip_unreadable=exp.data.skip_unreadable)
        self.skipped = self._listed_skipped()  # files skipped so far (a resumed run keeps the list)
        self.data_warnings = DataWarnings()  # warnings while reading items: one line per kind and pass
        self.saved_at = time.monotonic()  # of the last last.pt (train.checkpoint_minutes)

        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best: float | None = None
        self.bad_evals = 0
        self.nonfinite_run = 0
        self.unfrozen = False
        self.last_metrics: dict[str, float] = {}
        rng = None
        if resume_path is not None:
            rng = self._load_resume(resume_path)
        self.ddp: nn.Module = self._wrap()
        if info.is_main:
            if resume_path is None:  # a resumed run keeps the config.yaml it was started with
                save_config(self.exp, self.run_dir / "config.yaml")
            for change in forced:
                self.log.warning(f"resume_force: {change} (config.yaml keeps the saved value)")
            self.log.info(f"run folder: {self.run_dir}")
            self.log.info(f"{exp.task}: {len(self.train_ds)} training images, "
                          f"{len(self.val_ds) if self.val_ds is not None else 0} validation images, "
                          f"{len(self.classes)} classes, device {self.device}, {info.world_size} process(es)")
        if rng is not None:  # last: nothing after this may consume randomness the original run did not
            ckpt_io.restore_rng(rng)

    # ---- set-up ------------------------------------------------------------------------------------------

    def _make_run_dir(self, resume_path: Path | None, runs_root: Path) -> Path:
        path: Path | None = None
        if self.info.is_main:
            if resume_path is not None:
                path = resume_path.parent
                ckpt_io.remove_stale_temporaries(path)
            elif self.exp.output_dir is not None:
                path = Path(self.exp.output_dir)
                if (path / "last.pt").exists():
                    raise ConfigError(f"output_dir: {path} already holds a run; continue it with resume=true "
                                      "or choose another output_dir")
                path.mkdir(parents=True, exist_ok=True)
            else:
                while path is None:  # two runs started together must not share a folder
                    candidate = resolve_output_dir(self.exp, runs_root)
                    try:
                        candidate.mkdir(parents=True)
                        path = candidate
                    except FileExistsError:
                        continue
        return Path(dist_utils.broadcast_object(str(path) if path else None))

    def _amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``train.amp`` on this device, or None for float32."""
        if not self.cfg.amp:
            return None
        dtype = torch.bfloat16 if self.cfg.amp_dtype == "bfloat16" else torch.float16
        if self.device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            self.log.warning("this GPU has no bfloat16; using float16 with a gradient scaler")
            dtype = torch.float16
        elif self.device.type == "cpu" and dtype == torch.float16:
            # CPU autocast takes float16 too, but few processors compute it natively
            self.log.warning("train.amp_dtype=float16 on the CPU is slow on most processors; bfloat16 is the "
                             "CPU's mixed precision")
        elif self.device.type not in ("cuda", "cpu"):
            self.log.warning(f"train.amp: no autocast on {self.device.type}; training in float32")
            return None
        self.log.info(f"mixed precision: {str(dtype).removeprefix('torch.')} autocast on {self.device.type}"
                      + (" with a gradient scaler" if dtype == torch.float16 else ""))
        return dtype

    def _wrap(self) -> nn.Module:
        if self.info.world_size == 1:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids,
                                       find_unused_parameters=self.task.find_unused_parameters)

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

    def _load_resume(self, path: Path) -> dict[str, Any]:
        ckpt = load_checkpoint(path, map_location="cpu")
        state = ckpt.get("train_state")
        if not state:
            raise ConfigError(f"resume: {path}: has no train_state (best.pt cannot be resumed; use last.pt)")
        if ckpt.get("task") != self.exp.task or ckpt.get("classes") != self.classes:
            raise ConfigError(f"resume: {path}: task or classes differ from this run's data")
        self.model.load_state_dict(ckpt["state_dict"])
        if self.ema is not None and ckpt.get("ema_state_dict"):
            self.ema.load_state_dict(ckpt["ema_state_dict"], state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.resumed_budget = state.get("time_budget")  # elapsed time and speed of a budgeted run
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best, self.bad_evals = state["best"], state["bad_evals"]
        self.last_metrics = dict(ckpt.get("metrics") or {})
        self.log.info(f"resuming {path} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                      f"step {self.step}")
        ranks = state["rng"]
        if len(ranks) != self.info.world_size:
            self.log.warning(f"resume: saved by {len(ranks)} process(es), now {self.info.world_size}: "
                             "random streams will differ from an uninterrupted run")
        return ranks[self.info.rank % len(ranks)]

    # ---- checkpoints -------------------------------------------------------------------------------------

    def _checkpoint(self, metrics: dict[str, float], *, resumable: bool) -> dict[str, Any]:
        train_state = None
        rngs = dist_utils.all_gather_object(ckpt_io.capture_rng()) if resumable else None
        if resumable:
            train_state = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best": self.best, "bad_evals": self.bad_evals,
                "time_budget": self._budget_state(),
                "ema_updates": self.ema.updates if self.ema is not None else 0, "rng": rngs,
            }
        return ckpt_io.make_checkpoint(
            exp=self.exp, model_cfg=self.model_cfg, classes=self.classes, preprocess=self.preprocess,
            model=self.model, ema_state=self.ema.state_dict() if self.ema is not None else None,
            metrics=metrics, train_state=train_state)

    def _save_last(self) -> None:
        ckpt = self._checkpoint(self.last_metrics, resumable=True)  # every rank: RNG states are gathered
        if self.info.is_main:
            ckpt_io.save(ckpt, self.run_dir / "last.pt")
        self.saved_at = time.monotonic()

    def _checkpoint_due(self) -> bool:
        """After an optimizer step: ``train.checkpoint_every`` steps or ``train.checkpoint_minutes`` since the
        last save (rank 0's clock decides for all ranks: saving gathers every rank's random state)."""
        every, minutes = self.cfg.checkpoint_every, self.cfg.checkpoint_minutes
        due = bool(every) and self.step % every == 0
        due = due or (minutes > 0 and time.monotonic() - self.saved_at >= minutes * 60)
        return bool(dist_utils.broadcast_object(due)) if self.info.world_size > 1 else due

    # ---- unreadable files ---------------------------------------------------------------------------------

    @staticmethod
    def _unreadable_hint(split: Any) -> str:
        check = "visiondet data check"
        if getattr(split, "annotations", None) and getattr(split, "images", None):
            check += f" --annotations {split.annotations} --images {split.images}"
        return f"find every such file with `{check}`, or set data.skip_unreadable=true to skip them"

    def _listed_skipped(self) -> set[str]:
        listed = self.run_dir / "skipped_images.txt"
        if not listed.is_file():
            return set()
        return {line.split("\t", 1)[0] for line in listed.read_text(encoding="utf-8").splitlines() if line}

    def _skip(self, files: list[Unreadable]) -> None:
        """data.skip_unreadable: list each file once in skipped_images.txt (path, tab, reason) and warn."""
        new = [f for f in dict.fromkeys(files) if f.path not in self.skipped]
        if not new:
            return
        with open(self.run_dir / "skipped_images.txt", "a", encoding="utf-8") as out:  # every rank appends
            for f in new:
                self.skipped.add(f.path)
                out.write(f"{f.path}\t{f.reason}\n")
                self.log.warning(f"skipped unreadable image {f.path}: {f.reason}")

    def _after_failure(self, exc: UnreadableImageError) -> UnreadableImageError:
        """An unreadable file ended the run: a run folder with no checkpoint is removed (it holds nothing
        to resume); one with a checkpoint keeps the error line at the end of train.log."""
        if not self.info.is_main:
            return exc
        if not any(self.run_dir.glob("*.pt")):
            # only what this run wrote: an output_dir given by the user may hold other files
            for name in ("config.yaml", "train.log", "metrics.jsonl", "curves.png", "skipped_images.txt",
                         "tensorboard"):
                path = self.run_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # when nothing else is left
            return exc
        hint = (f"continue with `visiondet train --resume {self.run_dir} data.skip_unreadable=true` or after "
                f"fixing the file; {exc.hint}")
        exc = UnreadableImageError(exc.path, exc.reason, hint)
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR ERROR: {exc}\n")
        return exc

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        status = "completed"
        failure: UnreadableImageError | None = None
        self.budget = self._start_budget()
        if self.budget is None and (line := self.lr_plan.warmup_warning()):
            self.log.warning(line)
        try:
            epoch = self.epoch
            while not self._schedule_done(epoch):
                self.epoch = epoch
                self._maybe_unfreeze(epoch)
                self.tick_at = clock()
                self._train_epoch(epoch)
                self.epoch, self.batch_in_epoch = epoch + 1, 0
                stop = self._end_of_epoch(epoch)
                saving = clock()
                self._save_last()
                if self.budget is not None:
                    self.budget.add_save(clock() - saving)
                if stop:
                    status = "early_stopped"
                    break
                epoch += 1
            if self.budget is not None:
                self.log.info(f"time budget: {_duration(self.budget.elapsed(clock()))} of "
                              f"{_duration(self.budget.seconds)} used, {self.step} optimizer steps")
        except UnreadableImageError as exc:
            failure = exc
        finally:
            self._finish()
        if failure is not None:
            raise self._after_failure(failure) from None  # one line, not a worker traceback
        return TrainResult(self.run_dir, status, self.epoch, self.best, dict(self.last_metrics),
                           skipped_images=len(self._listed_skipped()))  # (every rank's)

    def _schedule_done(self, epoch: int) -> bool:
        """Whether the run has reached its end: ``train.epochs``, or the steps its time budget fits."""
        if self.budget is None:
            return epoch >= self.cfg.epochs
        return self.step >= self.lr_plan.total_steps

    # ---- time budget (train.time_budget): the schedule laid over the steps that fit ------------------------

    def _start_budget(self) -> TimeBudget | None:
        if self.cfg.time_budget is None:
            return None
        seconds = parse_duration(self.cfg.time_budget, "train.time_budget")
        per_rank = self.cfg.batch_size * self.info.world_size
        budget = TimeBudget(seconds, steps_per_epoch=self.steps_per_epoch, eval_every=self.cfg.eval_every,
                            eval_batches=math.ceil(len(self.val_ds) / per_rank) if self.val_ds else 0)
        saved = getattr(self, "resumed_budget", None)
        if saved:
            budget.load_state_dict(saved)
            self.lr_plan.total_steps = int(saved["total_steps"])
        else:  # until the first steps are timed: no end in sight, so no decay yet and the full warm-up
            self.lr_plan.total_steps = 1 << 40
        now = clock()
        budget.start(now)
        self.tick_at, self.ticked_step = now, self.step
        self.budget_laid = budget.step_s is not None  # (a resumed run's plan was logged before)
        self.log.info(f"time budget {_duration(seconds)}"
                      + (f" ({_duration(budget.elapsed(now))} used before this resume)" if saved else "")
                      + ": the schedule is laid over the steps that fit once the first ones are timed")
        return budget

    def _budget_tick(self) -> bool:
        """After each batch under a time budget: time the optimizer step just taken, re-lay the schedule over
        the steps that fit the time left, and say whether the run has reached that end."""
        if self.budget is None or self.step == self.ticked_step:
            return False
        now = clock()
        self.budget.add_step(now - self.tick_at)
        self.tick_at, self.ticked_step = now, self.step
        total = self._relay(now)
        if total is None:
            return False
        b = self.budget
        if not self.budget_laid:
            self.budget_laid = True
            self.log.info(f"time budget: {b.step_s:.3g} s per step, {b.eval_s:.3g} s per evaluation "
                          f"({'measured' if b.eval_count else 'estimated'}): {total} optimizer steps "
                          f"({total / self.steps_per_epoch:.1f} epochs), warm-up {self.lr_plan.warmup_steps}")
            if line := self.lr_plan.warmup_warning():  # not a warning: no config can know the steps that fit
                self.log.info(line)
        if total == self.step and b.seconds - b.elapsed(now) < b.eval_s + 2 * b.save_s:
            self.log.warning(f"time budget {_duration(b.seconds)}: no room left after step {self.step} "
                             f"(a step takes {b.step_s:.3g} s, an evaluation about {b.eval_s:.3g} s): the "
                             "run ends now, with its final evaluation, and may pass the budget")
        return self.step >= total

    def _relay(self, now: float, *, epoch_end_done: bool = False) -> int | None:
        """Lay the schedule over the steps that fit the time left (None: the speed is not measured yet)."""
        total = self.budget.plan(self.step, now, epoch_end_done=epoch_end_done) if self.info.is_main else None
        if self.info.world_size > 1:  # every rank must stop at the same step: rank 0's clock decides
            total = dist_utils.broadcast_object(total)
        if total is not None:
            self.lr_plan.total_steps = total
        return total

    def _planned_epochs(self, epoch: int) -> int:
        """train.epochs, or the epochs the time budget's plan reaches (for the progress line)."""
        if self.budget is None:
            return self.cfg.epochs
        if not self.budget_laid:  # not timed yet
            return epoch + 1
        return max(epoch + 1, math.ceil(self.lr_plan.total_steps / self.steps_per_epoch))

    def _budget_state(self) -> dict[str, float] | None:
        budget = getattr(self, "budget", None)
        if budget is None:
            return None
        return {**budget.state_dict(clock()), "total_steps": self.lr_plan.total_steps}

    def _maybe_unfreeze(self, epoch: int) -> None:
        at = self.cfg.unfreeze_at_epoch
        if at is None or epoch < at or self.unfrozen:
            return
        self.model.unfreeze_backbone()
        self.unfrozen = True
        if self.info.world_size > 1:  # DDP fixes its parameter set when wrapping: wrap again
            self.ddp = self._wrap()
        self.log.info(f"epoch {epoch + 1}: backbone unfrozen (fine-tuning all layers)")

    def _train_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        batches = self._batches(epoch)
        start = self.batch_in_epoch
        self.items.epoch = epoch
        loader = DataWait(make_loader(self.items, batches[start:], self.task.collate,
                                      workers=self.exp.data.workers, pin_memory=self.device.type == "cuda",
                                      seed=self.exp.seed + epoch, on_skip=self._skip,
                                      hint=self._unreadable_hint(self.exp.data.train),
                                      data_warnings=self.data_warnings))
        progress = self.log.progress(epoch=epoch, epochs=self._planned_epochs(epoch), total=len(batches),
                                     start=start, log_every=cfg.log_every, data_wait=loader)
        record_mark = loader.mark()  # start of the next metrics record's data-wait window
        self.ddp.train()
        window = 0  # batches whose gradients wait for the next optimizer step
        sums: dict[str, torch.Tensor] = {}
        logged_batches = 0
        try:
            for i, (indices, batch) in enumerate(loader, start):
                images, targets = self.task.move_batch(batch, self.device)
                buffers = self._snapshot_buffers()
                closes_window = (i + 1) % cfg.accum_steps == 0 or i + 1 == len(batches)
                no_sync = not closes_window and self.ddp is not self.model
                with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        _, losses = self.ddp(images, targets)
                    loss = sum(losses.values())
                    finite = self._finite_everywhere(loss)
                    if finite:
                        self.scaler.scale(loss / cfg.accum_steps).backward()
                        window += 1
                if finite:
                    self.nonfinite_run = 0
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                    logged_batches += 1
                else:
                    self._restore_buffers(buffers)  # BatchNorm statistics saw the bad batch
                    self._nonfinite(losses, indices, i)
                    self.optimizer.zero_grad(set_to_none=True)  # drop this window's partial gradients
                    window = 0
                self.batch_in_epoch = i + 1
                if closes_window and window > 0:
                    if self._optimizer_step():
                        self.step += 1
                        if self.step % cfg.log_every == 0:
                            self._log_train(sums, logged_batches, epoch, loader.share(record_mark))
                            sums, logged_batches, record_mark = {}, 0, loader.mark()
                        if self._checkpoint_due() and i + 1 < len(batches):  # (epoch end saves)
                            self._save_last()
                    window = 0
                progress.update(1, {"loss": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"]})
                if self._budget_tick():  # the time budget's last step (it may end inside an epoch)
                    break
        finally:
            progress.close()
        self._report_data_warnings(f"epoch {epoch + 1}")

    def _report_data_warnings(self, where: str) -> None:
        """One line per kind of warning raised while reading (this process's share), not one per image."""
        for line in self.data_warnings.lines():
            self.log.warning(f"{where}: {line}")

    def _snapshot_buffers(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.model.buffers()]

    def _restore_buffers(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for buffer, value in zip(self.model.buffers(), saved, strict=True):
                buffer.copy_(value)

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        # every rank must take the same branch, or DDP's gradient all-reduce would wait forever
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.info.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _nonfinite(self, losses: dict[str, torch.Tensor], indices: list[int], i: int) -> None:
        self.nonfinite_run += 1
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()] or ["(on another rank)"]
        names = self.task.sample_names(self.train_ds, indices)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.warning(f"non-finite loss {', '.join(bad)} at epoch {self.epoch + 1}, batch {i + 1}, "
                         f"step {self.step}, lr {lr:.4g}; images: {', '.join(names)}; step skipped "
                         f"({self.nonfinite_run} in a row)")
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            self.batch_in_epoch = i + 1
            self._save_last()
            raise TrainingError(f"{self.nonfinite_run} non-finite losses in a row ({', '.join(bad)}): stop. "
                                f"The last good state is in {self.run_dir / 'last.pt'}. Lower train.lr, "
                                "add warm-up (train.warmup_iters) or gradient clipping (train.grad_clip), "
                                "or check the images named above.")

    def _optimizer_step(self) -> bool:
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if not torch.isfinite(norm) and not self.scaler.is_enabled():
                self.log.warning(f"non-finite gradient norm at step {self.step}; step skipped")
                self.optimizer.zero_grad(set_to_none=True)
                return False
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.get_scale() < scale:  # float16 overflow: the scaler skipped the step and backed off
            return False  # (common in the first steps while the scale settles; not an error)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    _data_wait_warned = False  # the data-wait warning is given once per run

    def _log_train(self, sums: dict[str, torch.Tensor], count: int, epoch: int, data_wait: float) -> None:
        keys = sorted(sums)
        totals = torch.stack([torch.as_tensor(sums[k], device=self.device) for k in keys]
                             + [torch.tensor(float(count), device=self.device),
                                torch.tensor(data_wait, device=self.device)])
        totals = dist_utils.all_reduce_sum(totals).tolist()
        values = {k: v / max(totals[-2], 1.0) for k, v in zip(keys, totals[:-2], strict=True)}
        values["loss"] = sum(values.values())
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["data_wait"] = totals[-1] / self.info.world_size  # the mean over the ranks
        if self.scaler.is_enabled():
            values["grad_scale"] = self.scaler.get_scale()
        self.log.record("train", step=self.step, epoch=epoch + 1, values=values)
        # not on the run's first record: it also holds the workers' start and the first CUDA calls
        if values["data_wait"] > 1 / 3 and self.step > self.cfg.log_every and not self._data_wait_warned:
            self._data_wait_warned = True
            self.log.warning(self._data_wait_advice(values["data_wait"]))

    def _data_wait_advice(self, share: float) -> str:
        data = self.exp.data
        cuda = self.device.type == "cuda"
        # each setting with its state now; a data.* key is suggested only where this config has it
        pin, persistent = getattr(data, "pin_memory", None), getattr(data, "persistent_workers", None)
        pin = cuda if pin is None else pin
        pin_text = f"pin_memory is {'on' if pin else 'off'}" + (
            ": set data.pin_memory=true" if cuda and not pin and hasattr(data, "pin_memory") else "")
        persistent_text = "persistent workers are " + (
            "on" if persistent else "off (workers start again every epoch)"
            + (": set data.persistent_workers=true" if persistent is not None else ""))
        first = max(self.step - self.cfg.log_every, 0) + 1
        return (f"steps {first}-{self.step} waited for data {share:.0%} of the time: the model is starved. "
                f"Raise data.workers (now {data.workers}; up to the CPU cores per process); {pin_text}; "
                f"{persistent_text}; or make the transforms cheaper")

    # ---- evaluation and the end of an epoch ---------------------------------------------------------------

    def _evaluate(self) -> dict[str, float]:
        assert self.val_ds is not None
        loader = eval_loader(self.val_ds, self.task.collate, batch_size=self.cfg.batch_size,
                             workers=self.exp.data.workers, pin_memory=self.device.type == "cuda",
                             skip_unreadable=self.exp.data.skip_unreadable,
                             hint=self._unreadable_hint(self.exp.data.val), on_skip=self._skip,
                             data_warnings=self.data_warnings)
        metrics: dict[str, float] = {}
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema is not None else [])
        for prefix, model in models:
            model.eval()
            try:
                with torch.inference_mode():
                    result = self.task.evaluate(model, loader, self.device, self.classes)
            except UnreadableImageError:
                if self.info.world_size == 1:  # the epoch's training is whole: keep it (resumable)
                    self._save_last()
                raise
            metrics.update({f"{prefix}{k}": float(v) for k, v in result.items()})
        self._report_data_warnings("validation")
        self.model.train()
        return metrics

    def _end_of_epoch(self, epoch: int) -> bool:
        """Evaluate every ``eval_every`` epochs and at the run's end; True to stop early."""
        if self.val_ds is None:
            return False
        last = self._schedule_done(epoch + 1)
        if (epoch + 1) % self.cfg.eval_every and not last:
            return False
        started = clock()
        stop = self._validate(epoch)
        if self.budget is not None:  # the time budget reserves this much for every evaluation left
            self.budget.add_eval(clock() - started)
            if not last and self._relay(clock(), epoch_end_done=True) is not None:  # its time measured
                left = self.budget.seconds - self.budget.elapsed(clock())
                self.log.info(f"time budget: {_duration(left)} left, {self.lr_plan.total_steps} optimizer "
                              f"steps planned ({self.step} done)")
        return stop

    def _validate(self, epoch: int) -> bool:
        metrics = self._evaluate()
        self.last_metrics = metrics
        self.log.record("val", step=self.step, epoch=epoch + 1, values=metrics)
        key = ("ema_" if self.ema is not None else "") + self.task.primary_metric
        if key not in metrics:
            raise TrainingError(f"the {self.task.name} evaluator returned no {key!r} (got {sorted(metrics)})")
        value = metrics[key]
        summary = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k)
        total = self.lr_plan.total_steps
        where = f"/{self.cfg.epochs}" if self.budget is None else f" (step {self.step}/{total})"
        self.log.info(f"epoch {epoch + 1}{where} validation: {summary}")
        if self.best is None or value > self.best:
            self.best, self.bad_evals = value, 0
            best = self._checkpoint(metrics, resumable=False)
            if self.info.is_main:
                ckpt_io.save(best, self.run_dir / "best.pt")
                self.log.info(f"new best {key} {value:.4f}: {self.run_dir / 'best.pt'}")
            return False
        self.bad_evals += 1
        if self.cfg.patience is not None and self.bad_evals >= self.cfg.patience:
            self.log.info(f"early stopping: {key} has not improved for {self.bad_evals} evaluations "
                          f"(best {self.best:.4f})")
            return True
        return False

    def _finish(self) -> None:
        if self.info.is_main:
            metrics_path = self.run_dir / "metrics.jsonl"
            self.log.close()
            if metrics_path.is_file():
                try:
                    plot_curves(metrics_path, self.run_dir / "curves.png")
                except Exception as exc:  # a plotting problem must not lose a finished run
                    print(f"warning: could not draw {self.run_dir / 'curves.png'}: {exc}")
        else:
            self.log.close()


def _duration(seconds: float) -> str:
    """``754.2`` -> ``12m34s`` (log lines of the time budget)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
