"""A run outside its recipe's measured scale says so, quoting the recipe's findings, which are the tables'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.engine import budget_config

from apps.config import build_experiment, deep_merge, load_yaml_with_bases, parse_overrides
from apps.engine.tested import untested_scale
from apps.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "detection" / "faster_rcnn_r18_fpn_cpu.yaml"


def load_config(path: Path, overrides: list[str]):
    """The recipe as `visiondet train` reads it, without its data folders (not there in the tests)."""
    return build_experiment(deep_merge(load_yaml_with_bases(path), parse_overrides(overrides)))


@pytest.fixture(scope="module")
def recipe():
    return load_config(RECIPE, ["train.time_budget=20m"])


def test_inside_the_tested_scale_nothing_is_said(recipe):
    assert untested_scale(recipe, 800) is None
    assert untested_scale(recipe, 3000) is None  # under 4x the studies' 800


@pytest.mark.parametrize(("overrides", "images", "reason"), [
    (["train.time_budget=5m"], 800, "a time budget of 5m, under the 10m this recipe was tested at"),
    ([], 150, "150 training images against the studies' 800"),
    ([], 4000, "4000 training images against the studies' 800"),
])
def test_outside_it_one_line_quotes_the_findings(overrides, images, reason):
    exp = load_config(RECIPE, ["train.time_budget=20m", *overrides])
    line = untested_scale(exp, images)
    assert line is not None and "\n" not in line and reason in line
    assert all(finding in line for finding in exp.tested.findings)


def test_without_a_tested_block_or_a_budget_nothing_is_said(recipe, tmp_path):
    assert untested_scale(load_config(RECIPE, ["tested=null"]), 10) is None
    fixed = load_config(RECIPE, ["train.time_budget=null"])
    assert "time budget" not in untested_scale(fixed, 10)  # the data's size still counts


def test_the_findings_are_rows_of_the_lessons_tables(recipe):
    lessons = (ROOT / "docs" / "LESSONS.md").read_text()
    sections = {m.group(1): m.start() for m in re.finditer(r"^## (\w+):", lessons, re.M)}
    for finding in recipe.tested.findings:
        study = finding.split(",")[0]
        assert study in sections, f"{finding!r}: no section ## {study} in docs/LESSONS.md"
        start = sections[study]
        end = min([s for s in sections.values() if s > start], default=len(lessons))
        table = lessons[start:end]
        for interval in re.findall(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", finding):
            assert interval in table, f"{finding!r}: {interval} is not in LESSONS.md's {study} table"


def test_train_logs_the_line(tmp_path, clock):
    cfg = budget_config(tmp_path, "small")  # 16 training items, a 60 s budget
    cfg["tested"] = {"budgets": ["10m"], "train_images": 800, "findings": ["a study, 10m: something"]}
    train(build_experiment(cfg))
    log = (tmp_path / "small" / "train.log").read_text()
    assert ("untested scale: a time budget of 60s, under the 10m this recipe was tested at and 16 training "
            "images against the studies' 800") in log and "found: a study, 10m: something" in log
