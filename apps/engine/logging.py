"""What a run reports: messages, a progress bar, metrics.jsonl, TensorBoard and a training-curves PNG.

Only rank 0 writes. Messages go to stderr (through ``tqdm.write`` so they do not break the bar) and to
``train.log`` in the run folder. On a terminal each epoch gets a tqdm bar (loss, lr, it/s, ETA); when the
output is not a terminal (CI, nohup, a pipe) the same figures come as plain lines every ``log_every`` steps.
Both, and every ``train`` record, carry ``data_wait``: the share of the wall time spent waiting for the next
batch (:class:`DataWait`), the first thing to look at when a GPU is not kept busy.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from apps.engine.distributed import all_reduce_sum

__all__ = ["RunLogger", "Progress", "BudgetView", "DataWait", "TrainRecords", "close_run", "plot_curves",
           "run_log"]

LOGGER_NAME = "visiondet.train"


class DataWait:
    """Iterates over a loader and measures how long each ``next()`` blocked.

    ``share(mark)`` is the fraction of the wall time since ``mark`` (a :meth:`mark`) spent waiting, so each
    reader (the progress line, the metrics record) keeps its own window. The training step reads its loss
    on the host every batch (a device sync), so on CUDA the time outside ``next()`` is the real compute time
    rather than a kernel queue that returned early.
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable
        self.waited = 0.0  # seconds blocked in next(), since construction

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield item

    def mark(self) -> tuple[float, float]:
        """(seconds waited so far, now): the start of a window."""
        return self.waited, time.perf_counter()

    def share(self, mark: tuple[float, float]) -> float:
        """Fraction of the time since ``mark`` spent waiting for data, in [0, 1]."""
        waited, since = mark
        elapsed = time.perf_counter() - since
        return min(max((self.waited - waited) / elapsed, 0.0), 1.0) if elapsed > 0 else 0.0


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class BudgetView(NamedTuple):
    """A time-budgeted run as the progress line shows it: the plan's length in epochs (None until the first
    steps are timed) and the seconds left in the budget."""

    epochs: float | None
    left_s: float


class Progress:
    """One epoch's progress: a tqdm bar on a terminal, else a plain line every ``log_every`` updates.

    A run of fixed length shows ``epoch 2/12`` and the epoch's ETA; a time-budgeted one (``budget``, asked
    at every update since the plan changes as the run goes) the plan's epochs, ``epoch 2/5.1``, and the time
    left in the budget instead of an ETA that would only cover the epoch.
    """

    def __init__(self, *, epoch: int, epochs: int, total: int, start: int, log_every: int, enabled: bool,
                 tty: bool, log: logging.Logger, data_wait: DataWait | None = None,
                 budget: Callable[[], BudgetView] | None = None) -> None:
        self.epoch, self.epochs, self.budget = epoch, epochs, budget
        self.desc = self._describe(budget() if budget is not None else None)
        self.total, self.done, self.log_every, self.log = total, start, log_every, log
        self.start_done, self.start_time = start, time.perf_counter()
        self.enabled = enabled
        # the bar shows the epoch's share so far; each plain line the share since the previous line
        self.data_wait = data_wait
        self.epoch_mark = self.line_mark = data_wait.mark() if data_wait is not None else (0.0, 0.0)
        self.bar = (tqdm(total=total, initial=start, desc=self.desc, file=sys.stderr, dynamic_ncols=True,
                         unit="it", leave=True) if enabled and tty else None)

    def _describe(self, view: BudgetView | None) -> str:
        if view is None:
            return f"epoch {self.epoch + 1}/{self.epochs}"
        return f"epoch {self.epoch + 1}/{'?' if view.epochs is None else f'{view.epochs:.1f}'}"

    def update(self, n: int, values: dict[str, float]) -> None:
        self.done += n
        if not self.enabled:
            return
        view = self.budget() if self.budget is not None else None
        if self.bar is not None:
            if self.data_wait is not None:
                values = {**values, "data_wait": self.data_wait.share(self.epoch_mark)}
            postfix = {k: f"{v:.4g}" for k, v in values.items()}
            if view is not None:
                self.bar.set_description(self._describe(view), refresh=False)
                postfix["budget_left"] = _format_eta(view.left_s)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.done % self.log_every == 0 or self.done == self.total:
            rate = (self.done - self.start_done) / max(time.perf_counter() - self.start_time, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            if self.data_wait is not None:
                values = {**values, "data_wait": self.data_wait.share(self.line_mark)}
                self.line_mark = self.data_wait.mark()
            figures = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
            left = f"eta {_format_eta(eta)}" if view is None else f"budget left {_format_eta(view.left_s)}"
            self.log.info(f"{self._describe(view)}  it {self.done}/{self.total}  {figures}  {rate:.2f} it/s  "
                          f"{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """Messages and metrics of one run; a silent stand-in on ranks other than 0 (``run_dir=None``)."""

    def __init__(self, run_dir: Path | None, *, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = run_dir is not None
        self.tty = sys.stderr.isatty()
        self.log = logging.getLogger(f"{LOGGER_NAME}.{id(self)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO if self.enabled else logging.ERROR)
        stream = _TqdmHandler()
        stream.setFormatter(logging.Formatter("%(message)s"))
        self.log.addHandler(stream)
        self.jsonl = None
        self.tb = None
        if run_dir is not None:
            file = logging.FileHandler(run_dir / "train.log")
            file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(file)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")  # closed in close()
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        self.log.info(message)

    def warning(self, message: str) -> None:
        self.log.warning(f"WARNING: {message}")

    def error(self, message: str) -> None:
        self.log.error(f"ERROR: {message}")

    def progress(self, *, epoch: int, epochs: int, total: int, start: int, log_every: int,
                 data_wait: DataWait | None = None, budget: Callable[[], BudgetView] | None = None
                 ) -> Progress:
        return Progress(epoch=epoch, epochs=epochs, total=total, start=start, log_every=log_every,
                        enabled=self.enabled, tty=self.tty, log=self.log, data_wait=data_wait, budget=budget)

    def record(self, split: str, *, step: int, epoch: int, values: dict[str, float]) -> None:
        """One metrics.jsonl line ``{"kind": split, "step", "epoch", "time", **values}`` (``split``: "train"
        or "val"; the file's key stays "kind") and TensorBoard scalars."""
        if self.jsonl is None:
            return
        row = {"kind": split, "step": step, "epoch": epoch, "time": round(time.time(), 3)}
        row.update({k: float(v) for k, v in values.items()})
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)


Panel = tuple[str, list[str], list[dict[str, Any]], str]  # title, keys, records, x key


def curve_panels(rows: list[dict[str, Any]]) -> list[Panel]:
    """What :func:`plot_curves` draws from metrics.jsonl records: (title, keys, records, x key) per panel."""
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    skip = {"kind", "step", "epoch", "time", "data_wait", "grad_scale"}
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")})
    # per-class values ("acc/cat") and image counts would crowd the panels
    val_keys = sorted({k for r in val for k in r
                       if k not in skip and "/" not in k and not k.endswith("images")})
    scores = [k for k in val_keys if all(0.0 <= r[k] <= 1.0 for r in val if k in r)]
    panels = [("training loss", loss_keys, train, "step"),
              ("learning rate", ["lr"] if any("lr" in r for r in train) else [], train, "step"),
              ("validation scores", scores, val, "epoch"),
              ("validation, other figures", [k for k in val_keys if k not in scores], val, "epoch")]
    return [p for p in panels if p[1]]


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """PNG of the training losses and lr by step and of the validation metrics by epoch (matplotlib Agg).

    Validation scores (fractions: AP, AR, mIoU, accuracy) get their own panel on a fixed 0-1 axis; anything
    else logged at validation (a detection count, say) goes to a panel of its own, since on one axis with the
    scores it squashes every score curve flat. Recall is dashed beside precision, and each line has its own
    colour from a 20-colour map (the default cycle repeats after ten).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    panels = curve_panels(rows)
    if not panels:
        return None
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)
    palette = colormaps["tab20"]
    for i, (title, keys, data, x_key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, key in enumerate(keys):
            points = [(r[x_key], r[key]) for r in data if key in r]
            marker = "o" if x_key == "epoch" or len(points) < 30 else None
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker=marker,
                    color=palette(j % 20), linestyle="--" if key.startswith("AR") else "-")
        ax.set_title(title)
        ax.set_xlabel(x_key)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if title == "validation scores":
            ax.set_ylim(0.0, 1.0)
        ax.legend(fontsize="small", ncols=2 if len(keys) > 6 else 1)
        ax.grid(alpha=0.3)
    fig.savefig(out_path, dpi=100)
    return out_path


def run_log(run_dir: Path) -> Callable[[str], None]:
    """A plain ``log(message)`` to stderr and the run's train.log, for work after the loop."""

    def log(message: str) -> None:
        print(message, file=sys.stderr)
        with open(run_dir / "train.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO {message}\n")

    return log


class TrainRecords:
    """The ``train`` records of metrics.jsonl: each loss averaged over the batches since the previous record
    (of this epoch) and over every process, with the lr, the data-wait share and the gradient scale. The
    first record whose steps waited for data more than a third of the time also gives one warning saying
    which settings to change."""

    def __init__(self, log: RunLogger, *, data: Any, device: torch.device, world_size: int,
                 log_every: int) -> None:
        self.log, self.data, self.device = log, data, device
        self.world_size, self.log_every = world_size, log_every
        self.warned = False
        self.start(None)

    def start(self, loader: DataWait | None) -> None:
        """A new epoch: its records measure the data wait of ``loader``."""
        self.loader, self.sums, self.count = loader, {}, 0
        self.mark = loader.mark() if loader is not None else (0.0, 0.0)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """One batch with finite losses."""
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1

    def write(self, *, step: int, epoch: int, lr: float, grad_scale: float | None) -> None:
        """The record after optimizer step ``step`` (every process calls it: the sums are reduced)."""
        keys = sorted(self.sums)
        data_wait = self.loader.share(self.mark) if self.loader is not None else 0.0
        totals = torch.stack([torch.as_tensor(self.sums[k], device=self.device) for k in keys]
                             + [torch.tensor(float(self.count), device=self.device),
                                torch.tensor(data_wait, device=self.device)])
        totals = all_reduce_sum(totals).tolist()
        values = {k: v / max(totals[-2], 1.0) for k, v in zip(keys, totals[:-2], strict=True)}
        values["loss"] = sum(values.values())
        values["lr"] = lr
        values["data_wait"] = totals[-1] / self.world_size  # the mean over the ranks
        if grad_scale is not None:
            values["grad_scale"] = grad_scale
        self.log.record("train", step=step, epoch=epoch + 1, values=values)
        # not on the run's first record: it also holds the workers' start and the first CUDA calls
        if values["data_wait"] > 1 / 3 and step > self.log_every and not self.warned:
            self.warned = True
            self.log.warning(self._data_wait_advice(values["data_wait"], step))
        self.sums, self.count = {}, 0
        self.mark = self.loader.mark() if self.loader is not None else (0.0, 0.0)

    def _data_wait_advice(self, share: float, step: int) -> str:
        data = self.data
        cuda = self.device.type == "cuda"
        # each setting with its state now; a data.* key is suggested only where this config has it
        pin, persistent = getattr(data, "pin_memory", None), getattr(data, "persistent_workers", None)
        pin = cuda if pin is None else pin
        pin_text = f"pin_memory is {'on' if pin else 'off'}" + (
            ": set data.pin_memory=true" if cuda and not pin and hasattr(data, "pin_memory") else "")
        persistent_text = "persistent workers are " + (
            "on" if persistent else "off (workers start again every epoch)"
            + (": set data.persistent_workers=true" if persistent is not None else ""))
        first = max(step - self.log_every, 0) + 1
        return (f"steps {first}-{step} waited for data {share:.0%} of the time: the model is starved. "
                f"Raise data.workers (now {data.workers}; up to the CPU cores per process); {pin_text}; "
                f"{persistent_text}; or make the transforms cheaper")


def close_run(log: RunLogger, run_dir: Path, is_main: bool) -> None:
    """Close the run's logs; rank 0 draws curves.png from metrics.jsonl (a failure there is a warning:
    a plotting problem must not lose a finished run)."""
    log.close()
    metrics_path = run_dir / "metrics.jsonl"
    if is_main and metrics_path.is_file():
        try:
            plot_curves(metrics_path, run_dir / "curves.png")
        except Exception as exc:
            print(f"warning: could not draw {run_dir / 'curves.png'}: {exc}")
