"""Interrupted runs, for real: child processes killed with SIGKILL mid-run and during a checkpoint write.

Every kill test is a deterministic CPU run of the toy task (BatchNorm, dropout and per-item random noise, so
every random stream matters) with last.pt written after every optimizer step. A resumed run must end
with exactly the weights, EMA weights and optimizer state of an uninterrupted run of the same length.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from support.engine import toy_config

from vision.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

CHILD = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import torch
from support.engine import ToyTask, register_toy_task
register_toy_task()
from apps.config import build_experiment
from apps.engine.trainer import train

cfg, kill_batch, kill_save = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
batches, saves = [0], [0]
move_batch, save = ToyTask.move_batch, torch.save

def killing_move_batch(self, batch, device):  # dies while loading batch number kill_batch
    batches[0] += 1
    if batches[0] == kill_batch:
        os.kill(os.getpid(), signal.SIGKILL)
    return move_batch(self, batch, device)

def killing_save(obj, f, *args, **kwargs):  # dies half-way through checkpoint write number kill_save
    saves[0] += 1
    if saves[0] == kill_save:
        f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)

ToyTask.move_batch, torch.save = killing_move_batch, killing_save
train(build_experiment(cfg))
"""


def run_child(tmp_path: Path, cfg: dict, *, kill_batch: int = 0, kill_save: int = 0) -> int:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), json.dumps(cfg), str(kill_batch), str(kill_save)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def config(tmp_path: Path, name: str, **extra) -> dict:
    cfg = toy_config(tmp_path, epochs=2, checkpoint_every=1, deterministic=True, ema=True, log_every=1)
    cfg["output_dir"] = str(tmp_path / name)
    cfg.update(extra)
    return cfg


def assert_same_final_state(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    for key in ("state_dict", "ema_state_dict"):
        assert x[key].keys() == y[key].keys()
        for name in x[key]:
            assert torch.equal(x[key][name], y[key][name]), f"{key}.{name}"
    xs, ys = x["train_state"], y["train_state"]
    assert (xs["epoch"], xs["step"]) == (ys["epoch"], ys["step"]) == (2, 8)
    for pid, state in xs["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], ys["optimizer"]["state"][pid]["momentum_buffer"])
    assert x["metrics"] == y["metrics"]


def test_killed_runs_resume_to_exactly_the_uninterrupted_result(tmp_path):
    assert run_child(tmp_path, config(tmp_path, "reference")) == 0

    # 1. killed half-way through writing the third last.pt: the second one is still there, whole
    assert run_child(tmp_path, config(tmp_path, "run"), kill_save=3) == -signal.SIGKILL
    run = tmp_path / "run"
    stray = list(run.glob(".last.pt.*.tmp"))
    assert len(stray) == 1 and stray[0].read_bytes().startswith(b"PK\x03\x04 the first bytes")
    assert load_checkpoint(run / "last.pt")["train_state"]["step"] == 2

    # 2. resumed, then killed while loading its 5th batch (epoch 2, batch 3): last.pt is mid-epoch
    assert run_child(tmp_path, config(tmp_path, "run", resume=True), kill_batch=5) == -signal.SIGKILL
    assert not list(run.glob(".*.tmp"))
    state = load_checkpoint(run / "last.pt")["train_state"]
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 6)

    # 3. resumed to the end: the same weights, EMA and optimizer state as the run never interrupted
    assert run_child(tmp_path, config(tmp_path, "run", resume=True)) == 0
    assert_same_final_state(tmp_path / "reference", run)
    assert (run / "train.log").read_text().count("resuming") == 2


def test_checkpoint_minutes_makes_a_killed_first_epoch_resumable(tmp_path):
    # killed while loading batch 3 of the first (and only) epoch: with a time interval, last.pt is there
    def one_epoch(name: str, minutes: float) -> dict:
        cfg = toy_config(tmp_path, epochs=1, checkpoint_every=0, checkpoint_minutes=minutes)
        return {**cfg, "output_dir": str(tmp_path / name)}

    timed = one_epoch("timed", 1e-6)
    assert run_child(tmp_path, timed, kill_batch=3) == -signal.SIGKILL
    state = load_checkpoint(tmp_path / "timed" / "last.pt")["train_state"]
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, 2, 2)
    # without one (only epoch ends save) the same kill leaves nothing to resume
    plain = one_epoch("plain", 0)
    assert run_child(tmp_path, plain, kill_batch=3) == -signal.SIGKILL
    assert not (tmp_path / "plain" / "last.pt").exists()


# ---- resuming is explicit: which run, with which settings -------------------------------------------------


def toy_run(tmp_path: Path, name: str, **train) -> tuple[Path, Path]:
    """A finished one-epoch toy run started from a config file; returns (config file, run folder)."""
    import yaml
    from support.engine import register_toy_task

    from apps.cli import main

    register_toy_task()
    cfg = toy_config(tmp_path, epochs=1, **train)
    cfg["output_dir"] = None
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "toy" / name
    assert main(["train", str(path), f"output_dir={run}"]) == 0
    return path, run


def test_resume_needs_a_run_folder_and_keeps_its_config(tmp_path, capsys, monkeypatch):
    from apps.cli import main

    monkeypatch.chdir(tmp_path)  # runs/ of `resume=true` is under the working folder
    first_cfg, first = toy_run(tmp_path, "first")
    _, second = toy_run(tmp_path, "second")
    os.utime(first / "last.pt", (1e9, 1e9))  # the older of the two
    capsys.readouterr()

    # resume=true alone guesses nothing: an error that lists the recent runs, newest first
    assert main(["train", str(first_cfg), "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "resume=true: which run?" in err and "--resume RUN_DIR" in err
    assert err.index("runs/toy/second") < err.index("runs/toy/first")

    # --resume RUN_DIR alone continues that run with its saved config, which is never rewritten
    saved = (first / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(first), "device=cpu", "train.log_every=2"]) == 0  # free to change
    assert (first / "config.yaml").read_bytes() == saved
    assert load_checkpoint(first / "last.pt")["train_state"]["epoch"] == 1  # nothing left: 1 epoch of 1

    # resume=RUN_DIR with a config file that says otherwise: refused, naming each change
    assert main(["train", str(first_cfg), f"resume={first}", "train.epochs=2", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 -> 2" in err and "train.lr: 0.1 -> 0.5" in err and "--force" in err
    assert load_checkpoint(first / "last.pt")["train_state"]["epoch"] == 1  # untouched
    # asked for: the run goes on with the new schedule; config.yaml still says how it was started
    assert main(["train", "--resume", str(first), "--force", "train.epochs=2"]) == 0
    assert load_checkpoint(first / "last.pt")["train_state"]["epoch"] == 2
    assert (first / "config.yaml").read_bytes() == saved
    assert "resume_force: train.epochs: 1 -> 2" in (first / "train.log").read_text()
    assert load_checkpoint(second / "last.pt")["train_state"]["epoch"] == 1  # the newest run: untouched
