"""Experiment config: YAML bases, dotted overrides, typed values, errors that name the key and suggest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from support.engine import ToyModelConfig, ToyOptions, register_toy_task

from apps.config import (
    ConfigError,
    Experiment,
    load_config,
    parse_overrides,
    resolve_output_dir,
    save_config,
)


@pytest.fixture(autouse=True)
def toy_task(monkeypatch):
    from apps.tasks import TASKS

    monkeypatch.setitem(TASKS, "toy", TASKS.get("toy", "support.engine:ToyTask"))
    register_toy_task()


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_parse_yaml_scalars_and_nest():
    got = parse_overrides(["train.lr=1e-4", "train.epochs=3", "train.amp=true", "train.milestones=[8, 11]",
                           "train.grad_clip=null", "output_dir=runs/x", "data.train.root=a=b"])
    assert got == {"train": {"lr": 1e-4, "epochs": 3, "amp": True, "milestones": [8, 11], "grad_clip": None},
                   "output_dir": "runs/x", "data": {"train": {"root": "a=b"}}}
    assert isinstance(got["train"]["lr"], float)  # PyYAML alone reads 1e-4 as a string
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_base_inheritance_deep_merges_and_overrides_win(tmp_path):
    write(tmp_path / "base" / "common.yaml", {"train": {"epochs": 10, "lr": 0.1, "momentum": 0.8}, "seed": 5})
    write(tmp_path / "base" / "toy.yaml", {"base": "common.yaml", "task": "toy", "data": {"train": {}},
                                           "train": {"lr": 0.05}})
    child = write(tmp_path / "exp" / "child.yaml", {"base": ["../base/toy.yaml"], "train": {"epochs": 4},
                                                    "model": {"width": 6}})
    exp = load_config(child, ["train.momentum=0.95", "data.options.num_items=10"])
    assert isinstance(exp, Experiment)
    assert (exp.train.epochs, exp.train.lr, exp.train.momentum, exp.seed) == (4, 0.05, 0.95, 5)
    assert exp.model == ToyModelConfig(width=6)
    assert exp.data.options == ToyOptions(num_items=10)
    assert exp.data.val is None


def test_unknown_keys_suggest_the_closest(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"task": "toy", "data": {"train": {}}, "train": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(str(cfg))
    cfg = write(tmp_path / "d.yaml", {"task": "toy", "data": {"train": {}}})
    hint = r"^override: unknown key 'train.epoch'; did you mean 'train.epochs'\?"
    with pytest.raises(ConfigError, match=hint):
        load_config(cfg, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.widht'; did you mean 'model.width'\?"):
        load_config(cfg, ["model.widht=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.train.rot'; did you mean 'data.train.root'\?"):
        load_config(cfg, ["data.train.rot=x"])
    with pytest.raises(ConfigError, match=r"unknown task 'toyy'; did you mean 'toy'\?"):
        load_config(cfg, ["task=toyy"])


def test_wrong_types_and_values_name_the_key(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"task": "toy", "data": {"train": {}}})
    cases = {
        "train.epochs=ten": r"train.epochs: expected int, got 'ten'",
        "train.epochs=2.5": r"train.epochs: expected int",
        "train.lr=fast": r"train.lr: expected float",
        "train.amp=1": r"train.amp: expected bool",
        "train.optimizer=adamm": r"train.optimizer: 'adamm' is not one of .*did you mean 'adam'\?",
        "train.betas=[0.9]": r"train.betas: expected 2 values",
        "train.epochs=0": r"train.epochs: must be >= 1",
        "train.milestones=[9, 3]": r"train.milestones: must be increasing",
        "data.train=5": r"data.train: expected a mapping",
    }
    for override, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            load_config(cfg, [override])
    exp = load_config(cfg, ["train.lr=1", "train.grad_clip=5", "resume=true"])
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float) and exp.train.grad_clip == 5.0
    assert exp.resume is True


def test_missing_files_fail_before_any_work(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"task": "classification", "data": {"train": {"root": str(tmp_path)}}})
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"data.val.root: {missing}: no such file or folder"):
        load_config(cfg, [f"data.val.root={missing}"])
    with pytest.raises(ConfigError, match=r"data.train.root: required by the classification task"):
        load_config(cfg, ["data.train.root=null"])
    with pytest.raises(ConfigError, match=rf"weights: {missing}: no such checkpoint file"):
        load_config(cfg, [f"weights={missing}"])
    with pytest.raises(ConfigError, match=r"no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_model_section_is_the_tasks_dataclass(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"task": "classification", "data": {"train": {"root": str(tmp_path)}},
                                      "model": {"backbone": "resnet18", "dropout": 0.2}})
    exp = load_config(cfg, ["model.mean=[0.5, 0.5, 0.5]"])
    assert type(exp.model).__name__ == "ClassifierConfig"
    assert exp.model.dropout == 0.2 and exp.model.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match=r"did you mean 'model.backbone'"):
        load_config(cfg, ["model.backbon=resnet50"])


def test_circular_bases_are_refused(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular base"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_reloads_identically_and_run_folders_are_numbered(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"task": "toy", "data": {"train": {}, "val": {}}})
    exp = load_config(cfg, ["train.betas=[0.8, 0.9]", "train.milestones=[2]"])
    save_config(exp, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == exp
    runs = tmp_path / "runs"
    assert resolve_output_dir(exp, runs) == runs / "toy" / "exp1"
    (runs / "toy" / "exp1").mkdir(parents=True)
    (runs / "toy" / "exp7").mkdir()
    (runs / "toy" / "expected").mkdir()  # not a run number
    assert resolve_output_dir(exp, runs) == runs / "toy" / "exp8"
    exp.output_dir = str(tmp_path / "mine")
    assert resolve_output_dir(exp, runs) == tmp_path / "mine"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "classification")
                                        .glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_classification_configs_load_and_say_what_they_reproduce(path, tmp_path):
    assert path.read_text().startswith("# "), "every config starts with a comment saying what it reproduces"
    exp = load_config(path, [f"data.train.root={tmp_path}", f"data.val.root={tmp_path}"])
    assert exp.task == "classification" and exp.train.epochs >= 1
    assert type(exp.model).__name__ == "ClassifierConfig"


TASK_CONFIGS = {  # one shipped config per task: the README's promise holds for each
    "detection": "configs/detection/faster_rcnn_r18_fpn_shapes_quick.yaml",
    "segmentation": "configs/segmentation/deeplabv3plus_r18_shapes_cpu.yaml",
    "classification": "configs/classification/resnet18_shapes.yaml",
}


@pytest.mark.parametrize("task", sorted(TASK_CONFIGS))
def test_known_synonyms_and_old_spellings_are_suggested_before_the_closest_spelling(task):
    config = Path(__file__).resolve().parents[1] / TASK_CONFIGS[task]

    def error(override: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_config(config, [override])
        message = str(caught.value)
        assert "\n" not in message  # one line
        return message

    # edit distance alone said 'train.min_lr_ratio' and 'model.mean'
    message = error("train.learning_rate=0.01")
    assert message.endswith("unknown key 'train.learning_rate'; did you mean 'train.lr'?")
    assert error("data.num_workers=4").endswith("did you mean 'data.workers'?")
    # pretrained names model.backbone_weights on every task (a rename for classifiers, a synonym elsewhere),
    # with torchvision's flag translated to the named source
    for value, meant in (("true", "imagenet"), ("false", "null"), ("weights/x.pt", "weights/x.pt")):
        message = error(f"model.pretrained={value}")
        assert f"model.backbone_weights: {meant}" in message and "model.mean" not in message, message
    if task == "segmentation":  # no freeze_at: no wrong turn to model.frozen_bn, the valid keys instead
        message = error("model.freeze_backbone=true")
        assert "which this section does not have; valid keys: model.arch," in message
        assert "did you mean" not in message
    else:
        assert "model.freeze_at: 5" in error("model.freeze_backbone=true")
        assert "model.freeze_at: 0" in error("model.freeze_backbone=false")
        assert "model.freeze_at: 2" in error("model.trainable_backbone_layers=3")
    # what no table knows still gets the closest spelling
    assert error("train.epoch=3").endswith("did you mean 'train.epochs'?")


def test_the_override_examples_of_train_help_are_keys_of_a_detection_config(capsys):
    # the help once showed data.train.root (a classification key) to everyone; each example must apply to
    # the tour's detection config as it stands
    from apps.cli import build_parser
    from apps.config import build_experiment, deep_merge, load_yaml_with_bases

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    examples = [e for e in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)*=[^\s,)\]]+)", capsys.readouterr().out)
                if e != "key=value"]  # (the usage line's metavar)
    assert "train.time_budget=20m" in examples and len(examples) >= 5, examples
    config = Path(__file__).resolve().parents[1] / "configs/detection/faster_rcnn_r18_fpn_shapes_quick.yaml"
    exp = build_experiment(deep_merge(load_yaml_with_bases(config), parse_overrides(examples)))
    assert exp.task == "detection" and exp.train.time_budget == "20m"
    # SplitConfig has every task's fields: a split key must be one the detection task reads
    from apps.tasks import get_task

    split_fields = [e.split("=")[0].split(".")[2] for e in examples
                    if e.startswith(("data.train.", "data.val."))]
    assert split_fields and set(split_fields) <= set(get_task("detection").split_keys), split_fields
