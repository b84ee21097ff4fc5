"""The training loop on the toy task (tests/support/engine.py), in this process: outputs of a run,
checkpoint format, non-finite losses, early stopping, accumulation, fine-tuning weights, data loading."""

from __future__ import annotations

import json
import statistics
import time
import warnings

import pytest
import torch
import yaml
from support.engine import ToyDataset, ToyModelConfig, ToyNet, register_toy_task, toy_config
from torch.utils.data import DataLoader

from apps.config import (
    ConfigError,
    DataConfig,
    SplitConfig,
    build_experiment,
    load_config,
    training_data_name,
)
from apps.demo.models import _trained_on as demo_data_line
from apps.engine.checkpointing import load_finetune_weights
from apps.engine.loader import IndexedCollate, SeededItems, epoch_batches, make_loader
from apps.engine.logging import DataWait
from apps.engine.trainer import TrainingError, train
from apps.tasks import TASKS, get_task, load_model
from vision.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    monkeypatch.setitem(TASKS, "toy", "support.engine:ToyTask")
    register_toy_task()


def run(tmp_path, *, options=None, val=True, **train_settings):
    cfg = toy_config(tmp_path, **train_settings)
    cfg["data"]["options"].update(options or {})
    if not val:
        cfg["data"]["val"] = None
    return train(build_experiment(cfg))


def test_a_run_writes_checkpoints_logs_and_curves(tmp_path):
    result = run(tmp_path, epochs=2, ema=True, log_every=2)
    folder = tmp_path / "run"
    assert result.run_dir == folder and result.status == "completed" and result.epochs_done == 2
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "train.log", "curves.png"):
        assert (folder / name).is_file(), name
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]  # 16 items / batch 4 = 4 steps per epoch
    assert all({"loss", "loss_cls", "lr"} <= set(r) for r in train_rows)
    assert [r["epoch"] for r in val_rows] == [1, 2] and {"accuracy", "ema_accuracy"} <= set(val_rows[0])

    last = load_checkpoint(folder / "last.pt")
    assert last["format"] == "visiondet" and last["version"] == 1 and last["task"] == "toy"
    assert last["model"] == {"num_classes": 2, "width": 4, "dropout": 0.2}
    assert last["classes"] == [{"id": 0, "name": "dark"}, {"id": 1, "name": "bright"}]
    keys = set(ToyNet(ToyModelConfig()).state_dict())
    assert set(last["state_dict"]) == set(last["ema_state_dict"]) == keys
    assert last["config"]["output_dir"] == str(folder) and last["config"]["train"]["epochs"] == 2
    meta = ("kind", "step", "epoch", "time")
    assert last["metrics"] == {k: v for k, v in val_rows[-1].items() if k not in meta}
    state = last["train_state"]
    assert (state["epoch"], state["batch_in_epoch"], state["step"], state["ema_updates"]) == (2, 0, 8, 8)
    assert load_checkpoint(folder / "best.pt")["train_state"] is None
    # the saved config is a complete description of the run
    assert load_config(folder / "config.yaml") == build_experiment({**toy_config(tmp_path, epochs=2, ema=True,
                                                                                 log_every=2)})

    loaded = load_model(folder / "best.pt", "cpu")
    assert loaded.task is get_task("toy") and not loaded.model.training
    best = load_checkpoint(folder / "best.pt")
    assert torch.equal(loaded.model.head.weight, best["ema_state_dict"]["head.weight"])
    raw = load_model(folder / "best.pt", "cpu", ema=False)
    assert torch.equal(raw.model.head.weight, best["state_dict"]["head.weight"])


def test_an_existing_run_is_never_overwritten_and_new_runs_are_numbered(tmp_path, monkeypatch):
    run(tmp_path, epochs=1)
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume=true"):
        run(tmp_path, epochs=1)
    cfg = toy_config(tmp_path, epochs=1)
    cfg["output_dir"] = None
    first = train(build_experiment(cfg), runs_root=tmp_path / "runs")
    second = train(build_experiment(cfg), runs_root=tmp_path / "runs")
    assert (first.run_dir, second.run_dir) == (tmp_path / "runs/toy/exp1", tmp_path / "runs/toy/exp2")


def test_a_non_finite_loss_skips_its_step_and_names_the_images(tmp_path):
    result = run(tmp_path, epochs=1, options={"nan_items": [5]}, val=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("non-finite loss") == 1
    warning = next(line for line in log.splitlines() if "non-finite loss" in line)
    assert "loss_cls" in warning and "toy-5" in warning and "lr " in warning and "step" in warning
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["train_state"]["step"] == 3  # 4 batches, one skipped
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert result.status == "completed"


def test_repeated_non_finite_losses_stop_with_the_last_good_state(tmp_path):
    with pytest.raises(TrainingError, match="3 non-finite losses in a row") as err:
        run(tmp_path, epochs=2, max_nonfinite=3, options={"nan_items": list(range(16))})
    assert "last.pt" in str(err.value)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["train_state"]["step"], state["train_state"]["batch_in_epoch"]) == (0, 3)
    assert all(torch.isfinite(v.float()).all() for v in state["state_dict"].values())


def test_early_stopping_after_patience_evaluations_without_progress(tmp_path):
    # a learning rate this small cannot change the predictions: the first evaluation stays the best
    result = run(tmp_path, epochs=6, lr=1e-12, patience=2)
    assert result.status == "early_stopped" and result.epochs_done == 3
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["bad_evals"] == 2


def test_gradient_accumulation_steps_once_per_window(tmp_path):
    run(tmp_path, epochs=1, batch_size=2, accum_steps=3, val=False)
    # 8 batches -> windows of 3, 3 and the last 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["step"] == 3


def test_fine_tuning_loads_matching_tensors_and_reinitialises_the_rest(tmp_path):
    torch.manual_seed(0)
    source = ToyNet(ToyModelConfig(num_classes=2))
    save_checkpoint({"format": "visiondet", "state_dict": source.state_dict()}, tmp_path / "src.pt")
    target = ToyNet(ToyModelConfig(num_classes=3))
    fresh_head = target.head.weight.detach().clone()
    report = load_finetune_weights(target, tmp_path / "src.pt")
    assert sorted(k for k, _, _ in report.reinitialised) == ["head.bias", "head.weight"]
    assert ("head.weight", (2, 4), (3, 4)) in report.reinitialised
    assert torch.equal(target.backbone[0].weight, source.backbone[0].weight)
    assert torch.equal(target.head.weight, fresh_head)
    line = "head.weight: shape [2, 4] in the checkpoint, [3, 4] in the model: re-initialised"
    assert any(line in x for x in report.lines())


def test_batches_and_augmentation_depend_only_on_seed_epoch_and_index():
    task, data = get_task("toy"), ToyDataset(12)

    def load(epoch, workers):
        items = SeededItems(data, seed=7, epoch=epoch)
        batches = epoch_batches(task, data, batch_size=4, seed=7, epoch=epoch, rank=0, world=1)
        loader = make_loader(items, batches, task.collate, workers=workers, pin_memory=False, seed=epoch)
        return [(idx, images) for idx, (images, _) in loader]

    serial, parallel, other_epoch = load(0, 0), load(0, 2), load(1, 0)
    assert [i for i, _ in serial] == [i for i, _ in parallel]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(serial, parallel, strict=True))
    assert [i for i, _ in serial] != [i for i, _ in other_epoch]
    assert sorted(sum((i for i, _ in serial), [])) == list(range(12))
    # the same item in another epoch gets other noise; the caller's generator is left untouched
    state = torch.random.get_rng_state()
    one = SeededItems(data, seed=7, epoch=0)[3][1][0]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(one, SeededItems(data, seed=7, epoch=1)[3][1][0])
    pairs = DataLoader(SeededItems(data, 7), batch_size=3, collate_fn=IndexedCollate(task.collate))
    assert next(iter(pairs))[0] == [0, 1, 2]


def test_finish_training_runs_once_after_the_loop_with_the_run_folder(tmp_path, monkeypatch):
    calls = []

    def finish(self, exp, run_dir, device, log):
        calls.append((run_dir, (run_dir / "last.pt").is_file(), str(device)))
        log("later stage done")
        return {"final_accuracy": 1.0}

    monkeypatch.setattr(type(get_task("toy")), "finish_training", finish)
    result = run(tmp_path, epochs=1, val=False)
    assert calls == [(tmp_path / "run", True, "cpu")]
    assert result.metrics == {"final_accuracy": 1.0}
    assert "later stage done" in (tmp_path / "run" / "train.log").read_text()


def test_data_wait_is_measured_over_each_window():
    def slow_items():
        for i in range(4):
            time.sleep(0.05)
            yield i

    wait = DataWait(slow_items())
    mark = wait.mark()
    for _ in wait:
        time.sleep(0.05)  # as long as the wait: about half the time is waiting
    assert 0.3 < wait.share(mark) < 0.7 and 0.18 < wait.waited < 0.5
    assert wait.share(wait.mark()) == 0.0  # a window that has not waited yet


def test_a_run_starved_of_data_says_so_in_every_record_and_warns_once(tmp_path, monkeypatch):
    slow = ToyDataset.__getitem__

    def sleepy(self, i):
        # 0.48 s per batch of 4 against a few ms of compute: the share stays above half even when a loaded
        # machine (load average ~20 on 2 cores) slows the step tenfold, where 0.05 s per item did not
        time.sleep(0.12)
        return slow(self, i)

    monkeypatch.setattr(ToyDataset, "__getitem__", sleepy)
    run(tmp_path, epochs=2, val=False, log_every=1)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["data_wait"] for r in rows if r["kind"] == "train"]
    # on a machine busy enough to slow the tiny step tenfold the share is still well above a third
    assert len(shares) == 8 and all(0.0 <= s <= 1.0 for s in shares), shares
    assert statistics.median(shares) > 0.5, shares
    log = (tmp_path / "run" / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "waited for data" in line]
    assert len(warnings) == 1, warnings
    assert "data.workers (now 0" in warnings[0] and "pin_memory is off" in warnings[0]
    assert "persistent workers are off" in warnings[0]
    lines = [line for line in log.splitlines() if " it " in line and "/4 " in line]  # progress lines
    assert len(lines) == 8 and all("data_wait 0." in line or "data_wait 1" in line for line in lines)


def test_curves_keep_scores_on_their_own_axis_and_counts_apart(tmp_path):
    from apps.engine.logging import curve_panels, plot_curves

    rows = [{"kind": "train", "step": s, "epoch": 1, "loss_cls": 1.0 / s, "loss_box": 0.5 / s, "lr": 0.01,
             "data_wait": 0.1} for s in range(1, 6)]
    for epoch, ap in ((1, 0.2), (2, 0.5)):
        rows.append({"kind": "val", "step": 5 * epoch, "epoch": epoch, "AP": ap, "AP50": ap + 0.2,
                     "AR100": ap + 0.1, "detections": 3500.0 * epoch, "AP/circle": ap, "images": 40.0})
    panels = {title: keys for title, keys, _, _ in curve_panels(rows)}
    # a detection count of thousands beside scores under 1 flattened every AP curve
    assert panels["validation scores"] == ["AP", "AP50", "AR100"]
    assert panels["validation, other figures"] == ["detections"]
    assert panels["training loss"] == ["loss_box", "loss_cls"] and panels["learning rate"] == ["lr"]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_curves(path, tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_run_folder_says_the_model_s_class_count_and_resumes_an_older_one(tmp_path):
    # the config asks for 7 classes; the data has 2, which is what the model gets and the run must say
    cfg = toy_config(tmp_path, epochs=1)
    cfg["model"] = {"num_classes": 7}
    train(build_experiment(cfg))
    folder = tmp_path / "run"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    last = load_checkpoint(folder / "last.pt")
    assert saved["model"]["num_classes"] == 2 == last["model"]["num_classes"]
    assert last["config"]["model"]["num_classes"] == 2
    # a run folder written before (config.yaml saying 7) still resumes without --force
    saved["model"]["num_classes"] = 7
    (folder / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    result = train(build_experiment({**cfg, "resume": True}))
    assert result.epochs_done == 1


def test_checkpoints_name_the_training_data_for_the_demo(tmp_path):
    cfg = toy_config(tmp_path, epochs=1)
    cfg["data"]["train"] = {"images": "data/pets_det/train/images",
                            "annotations": "data/pets_det/train/annotations.json"}
    train(build_experiment(cfg))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(tmp_path / "run" / name)
        assert ckpt["trained_on"] == "pets_det (train)"
        assert demo_data_line(ckpt) == ("pets_det (train)", False)  # what the demo's model line says

    cfg["data"]["name"] = "my pets, March"
    cfg["output_dir"] = str(tmp_path / "named")
    train(build_experiment(cfg))
    assert load_checkpoint(tmp_path / "named" / "last.pt")["trained_on"] == "my pets, March"


@pytest.mark.parametrize(("split", "name"), [
    ({"root": "data/shapes_cls/train"}, "shapes_cls (train)"),
    ({"images": "coco/train2017", "annotations": "coco/annotations/instances_train2017.json"},
     "coco (instances_train2017)"),
    ({"images": "/srv/voc/VOC2012/JPEGImages"}, "voc (VOC2012)"),
    ({"annotations": "labels.json"}, "labels"),
])
def test_the_training_data_name_is_the_dataset_folder_and_split(split, name):
    assert training_data_name(DataConfig(train=SplitConfig(**split))) == name


def test_warnings_while_reading_are_one_line_per_epoch_not_one_per_image(tmp_path, monkeypatch):
    plain = ToyDataset.__getitem__

    def warning(self, i):
        warnings.warn(f"/data/{i:03d}.png: image is 8x8 but the JSON says 9x9; boxes are clipped",
                      stacklevel=2)
        return plain(self, i)

    monkeypatch.setattr(ToyDataset, "__getitem__", warning)
    with warnings.catch_warnings(record=True) as shown:  # nothing reaches Python's own warning output
        warnings.simplefilter("always")
        run(tmp_path, epochs=2)
    assert not [w for w in shown if "boxes are clipped" in str(w.message)]
    log = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "clipped" in line]
    assert len(log) == 4, log  # two epochs of training and two validations: one line each
    assert "epoch 1: 16 warnings like this one while reading the data: /data/" in log[0]
    assert "validation: " in log[1] and "warnings like this one" in log[1]
