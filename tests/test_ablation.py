"""benchmarks/ablation.py: the table's arithmetic by hand, the run order and resuming (with stand-in runs),
every arm of every study a valid config that builds, and the smoke study end to end (2 arms, 2 seeds, 20 s
each)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from apps.config import load_config
from apps.tasks import get_task
from benchmarks.ablation import CONFIG, CROPS_CONFIG, job_overrides, main, pending_jobs
from benchmarks.ablation_stats import difference, mean_std, study_table
from benchmarks.ablation_studies import SMOKE, STUDIES
from vision.data.synthetic import make_shapes

T_975 = {1: 12.706204736, 2: 4.302652730}  # Student's t quantiles (0.975) from a printed table


def test_mean_std_and_a_paired_interval_by_hand():
    assert mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    arm, base = {0: 0.50, 1: 0.60, 2: 0.70}, {0: 0.45, 1: 0.50, 2: 0.62}
    # differences 0.05, 0.10, 0.08: mean 0.076667, sd sqrt((0.026667^2 + 0.023333^2 + 0.003333^2) / 2)
    sd = math.sqrt((0.0266667**2 + 0.0233333**2 + 0.0033333**2) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    d = difference(arm, base)
    assert d.kind == "paired" and d.df == 2
    assert d.mean == pytest.approx(0.0766667, abs=1e-6)
    assert (d.low, d.high) == pytest.approx((0.0766667 - half, 0.0766667 + half), abs=1e-5)
    assert d.excludes_zero() and d.low == pytest.approx(0.01414, abs=1e-4)


def test_a_welch_interval_when_the_seeds_differ():
    # arm seeds 0,1 (0.4, 0.6): mean 0.5, var 0.02; baseline seeds 0,1,2 (0.3, 0.4, 0.5): mean 0.4, var 0.01
    d = difference({0: 0.4, 1: 0.6}, {0: 0.3, 1: 0.4, 2: 0.5})
    v1, v2 = 0.02 / 2, 0.01 / 3
    df = (v1 + v2) ** 2 / (v1**2 / 1 + v2**2 / 2)
    assert d.kind == "Welch" and d.df == pytest.approx(df) and d.mean == pytest.approx(0.1)
    assert 1 < df < 2  # so the quantile lies between those of 1 and 2 degrees of freedom
    half = (d.high - d.low) / 2
    assert T_975[2] * math.sqrt(v1 + v2) < half < T_975[1] * math.sqrt(v1 + v2)
    assert not d.excludes_zero()
    one = difference({0: 0.4}, {0: 0.3})
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and "no interval" in one.text()


def test_the_table_has_a_row_per_arm_and_says_which_interval():
    records = [{"arm": a, "seed": s, "AP": ap, "AP50": ap + 0.2, "AP_small": ap / 2, "steps": 100 + s,
                "minutes": 20.0} for a, aps in (("A", (0.5, 0.6, 0.7)), ("B", (0.45, 0.5, 0.62)))
               for s, ap in enumerate(aps)]
    table = study_table(records, ["B", "A", "C"], "B")
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "0.600 ± 0.100" in rows["A"] and "101 ± 1" in rows["A"]
    assert "+0.077 [+0.014, +0.139] *" in rows["A"]
    assert "B (baseline)" in rows and rows["C"].startswith("| C | — | not yet run | — |")
    assert "paired by seed" in table


def test_runs_are_seed_major_and_finished_pairs_are_skipped():
    study = STUDIES["precision"]
    assert pending_jobs(study, [0, 1, 2], set()) == [
        ("float32", 0), ("bfloat16", 0), ("float32", 1), ("bfloat16", 1), ("float32", 2), ("bfloat16", 2)]
    assert pending_jobs(study, [0, 1], {("float32", 0), ("bfloat16", 1)}) == [("bfloat16", 0), ("float32", 1)]


def test_every_arm_of_every_study_is_a_config_that_builds(tmp_path):
    data = tmp_path / "data"
    make_shapes("detection", data, num_images=6, seed=0, image_size=(64, 80), val_fraction=0.34)
    task = get_task("detection")
    built = set()
    for study in (*STUDIES.values(), SMOKE):
        assert study.arm(study.baseline) and len({a.name for a in study.arms}) == len(study.arms)
        for arm in study.arms:
            exp = load_config(CONFIG, job_overrides(study, arm.name, 0, 60.0, data, tmp_path / "run", 1))
            assert exp.train.time_budget == "60.0s" and exp.data.val is not None
            datasets = task.build_datasets(exp)  # the pipeline (mosaic too) is built here
            exp, _ = task.fit_to_data(exp, datasets)  # anchors "auto", as training starts
            key = repr(exp.model)
            if key not in built:
                built.add(key)
                task.build_model(exp.model, datasets.classes)
    crops = load_config(CROPS_CONFIG, [f"data.train.root={tmp_path}", f"data.val.root={tmp_path}"])
    assert crops.task == "classification" and crops.model.backbone == "resnet18"
    assert len(built) >= 8  # the studies change the model in that many ways


@pytest.mark.slow
def test_the_smoke_study_runs_resumes_and_its_table_adds_up(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["--smoke", "--out", str(out), "--plot", str(out / "smoke.png")]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in records) == [("cosine", 0), ("cosine", 1), ("one-cycle", 0),
                                                              ("one-cycle", 1)]
    for r in records:
        assert r["budget_s"] == 20.0 and r["steps"] >= 1 and r["curve"] and 0 <= r["AP"] <= 1
        assert {"commit", "machine", "wall_s", "AP_small"} <= set(r)
        assert r["machine"]["parallel"] == 2 and r["machine"]["threads"] == 1
    assert (out / "smoke.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out

    # the one-cycle row, by hand: mean and sample std of two runs, the paired interval with t(0.975, 1)
    ap = {(r["arm"], r["seed"]): r["AP"] for r in records}
    a, b = ap["one-cycle", 0], ap["one-cycle", 1]
    d = [ap["one-cycle", s] - ap["cosine", s] for s in (0, 1)]
    half = T_975[1] * abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)
    mean_d = sum(d) / 2
    row = next(line for line in table.splitlines() if line.startswith("| one-cycle |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{(a + b) / 2:.3f} ± {abs(a - b) / math.sqrt(2):.3f}"
    assert re.sub(r" \*$", "", cells[7]) == f"{mean_d:+.3f} [{mean_d - half:+.3f}, {mean_d + half:+.3f}]"

    # started again, it finds every pair done and runs nothing
    assert main(["--smoke", "--out", str(out)]) == 0
    assert "0 runs to do (4 done)" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_a_results_file_of_another_budget_is_refused(tmp_path):
    out = tmp_path / "smoke"
    out.mkdir()
    line = {"study": "smoke", "arm": "cosine", "seed": 0, "budget_s": 99.0, "data": str(out / "data")}
    (out / "results.jsonl").write_text(json.dumps(line) + "\n")
    (out / "data" / "val").mkdir(parents=True)
    (out / "data" / "val" / "annotations.json").write_text("{}")
    with pytest.raises(SystemExit, match="another budget or data set"):
        main(["--smoke", "--out", str(out)])
    assert Path(out / "results.jsonl").read_text().count("\n") == 1


class FakeRun:
    """Stands in for a run's child process: writes the run's result line at once (or fails)."""

    started: list[tuple[str, int, str]] = []
    failing: set[tuple[str, int]] = set()

    def __init__(self, args, *, cwd, env, stdout, stderr):
        spec = json.loads(Path(args[-1]).read_text())
        key = (spec["arm"], spec["seed"])
        FakeRun.started.append((*key, env["OMP_NUM_THREADS"]))
        self.returncode = None
        self.code = 1 if key in FakeRun.failing else 0
        if not self.code:
            record = {"study": spec["study"], "arm": spec["arm"], "seed": spec["seed"],
                      "budget_s": spec["seconds"], "data": spec["data"], "AP": 0.1 * spec["seed"],
                      "AP50": 0.2, "steps": 10, "wall_s": 1.0}
            (Path(spec["run_dir"]) / "result.json").write_text(json.dumps(record))

    def poll(self):
        self.returncode = self.code
        return self.code


def test_a_study_resumes_skipping_finished_runs_and_restarting_cut_ones(tmp_path, monkeypatch):
    import benchmarks.ablation as ablation

    # git and platform.processor() run through Popen too
    monkeypatch.setattr(ablation, "_commit", lambda: "abc1234")
    monkeypatch.setattr(ablation, "_machine", lambda: {"host": "test"})
    monkeypatch.setattr(ablation.subprocess, "Popen", FakeRun)
    monkeypatch.setattr(ablation.time, "sleep", lambda seconds: None)
    FakeRun.started, FakeRun.failing = [], {("float32", 2)}
    out, data = tmp_path / "study", tmp_path / "data"
    out.mkdir()
    done = {"study": "precision", "arm": "float32", "seed": 0, "budget_s": 60.0, "data": str(data), "AP": 0.5}
    (out / "results.jsonl").write_text(json.dumps(done) + "\n")
    cut = out / "runs" / "bfloat16" / "seed0"  # a run cut short: its folder holds a half-written run
    cut.mkdir(parents=True)
    (cut / "stale.txt").write_text("from the run that was cut short")
    study = STUDIES["precision"]
    with pytest.raises(SystemExit, match="float32 / seed 2: exit code 1"):
        ablation.run_study(study, seeds=[0, 1, 2], seconds=60.0, data=data, out=out, parallel=2, threads=1,
                           eval_every=1, crops=None)
    assert FakeRun.started == [("bfloat16", 0, "1"), ("float32", 1, "1"), ("bfloat16", 1, "1"),
                               ("float32", 2, "1"), ("bfloat16", 2, "1")]
    assert not (cut / "stale.txt").exists() and (cut / "job.json").is_file()
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"]) for r in lines] == [("float32", 0), ("bfloat16", 0), ("float32", 1),
                                                      ("bfloat16", 1), ("bfloat16", 2)]
    # started again, only the failed run is left to do
    FakeRun.started, FakeRun.failing = [], set()
    records = ablation.run_study(study, seeds=[0, 1, 2], seconds=60.0, data=data, out=out, parallel=2,
                                 threads=1, eval_every=1, crops=None)
    assert FakeRun.started == [("float32", 2, "1")] and len(records) == 6
