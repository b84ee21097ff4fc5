"""Ablation studies on real photographs: which of the recipe's choices matter, measured over seeds.

    python -m benchmarks.ablation --list                                   # the studies and their arms
    python -m benchmarks.ablation precision --minutes 20 --seeds 3 --parallel 2 --threads 1
    python -m benchmarks.ablation precision --no-run --markdown --plot     # the table and plot of what ran
    python -m benchmarks.ablation --smoke                                  # the machinery in about a minute

A study (benchmarks/ablation_studies.py) is a baseline arm and other arms, each a set of config overrides
on configs/detection/faster_rcnn_r18_fpn_cpu.yaml. Every arm trains on the real-imagery set
(benchmarks/realset.py, built into --data when missing) for the same ``train.time_budget``, once per seed,
and is scored by benchmarks/real_imagery.py's ``evaluate`` (pycocotools on the validation split) like the
benchmark itself. Runs are interleaved in time, seed-major (seed 0 of every arm, then seed 1 ...), so a
machine that slows down or speeds up part-way hits every arm alike; ``--parallel N --threads T`` keeps N
runs going at once at T threads each.

Honesty of the budget: every run evaluates on the validation split every ``--eval-every`` epochs inside
its own budget (the trainer reserves the time; the figures of the AP-over-time plot are those
evaluations), so each arm pays for its own evaluations as a user's run would; the final figures are
``last.pt`` re-scored after the budget (``best.pt`` for the early-stopping arms, which is what early
stopping keeps, picked on the same split, so optimistic). A pretraining arm (transfer study) spends
its pretraining inside the same wall-clock budget: its detector gets what the classification run left.

Each finished run is one line of ``<out>/results.jsonl`` (study, arm, seed, AP, AP50, AP_small, steps,
minutes trained, wall time, the AP-over-time points, the commit, the machine and its load average);
a study started again skips the (arm, seed) pairs that line already holds and starts the others afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: the repository root first on sys.path
    sys.path[0] = str(ROOT)

from benchmarks.ablation_stats import plot_study, study_table  # noqa: E402
from benchmarks.ablation_studies import SMOKE, STUDIES, Study, study_named  # noqa: E402

CONFIG = ROOT / "configs" / "detection" / "faster_rcnn_r18_fpn_cpu.yaml"
CROPS_CONFIG = ROOT / "configs" / "classification" / "resnet18_realset_crops.yaml"
SMOKE_SECONDS, SMOKE_SEEDS = 20.0, 2


# ---------------------------------------------------------------------------------------------- one run


def job_overrides(study: Study, arm_name: str, seed: int, seconds: float, data: Path, out: Path,
                  eval_every: int) -> list[str]:
    """The detector's config overrides for one (arm, seed): data, budget, seed, the study's and the arm's."""
    arm = study.arm(arm_name)
    return [
        f"data.train.images={data / 'train' / 'images'}",
        f"data.train.annotations={data / 'train' / 'annotations.json'}",
        f"data.val.images={data / 'val' / 'images'}",
        f"data.val.annotations={data / 'val' / 'annotations.json'}",
        f"train.time_budget={seconds:.1f}s",
        f"train.eval_every={eval_every}",
        f"seed={seed}",
        f"output_dir={out}",
        *study.overrides,
        *arm.overrides,
    ]


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (arm, seed) in this process (a child of the study); its results line."""
    import torch

    from apps.config import load_config
    from apps.engine.trainer import train
    from benchmarks.real_imagery import score_checkpoint

    started, clock0, load0 = time.time(), time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(spec["threads"])
    study, data, run_dir = study_named(spec["study"]), Path(spec["data"]), Path(spec["run_dir"])
    arm = study.arm(spec["arm"])
    seconds = float(spec["seconds"])
    overrides = job_overrides(study, arm.name, spec["seed"], seconds, data, run_dir / "detector",
                              spec["eval_every"])
    if arm.pretrain == "crops":  # a classification run on the crops, inside this run's wall-clock budget
        crops = Path(spec["crops"])
        train(load_config(CROPS_CONFIG, [
            f"data.train.root={crops / 'train'}", f"data.val.root={crops / 'val'}",
            f"train.time_budget={seconds * arm.pretrain_share:.1f}s", f"seed={spec['seed']}",
            f"output_dir={run_dir / 'pretrain'}"]))
        left = max(seconds - (time.perf_counter() - clock0), 1.0)  # (an overrun leaves the detector 1 s)
        overrides = [o if not o.startswith("train.time_budget=") else f"train.time_budget={left:.1f}s"
                     for o in overrides] + [f"model.backbone_weights={run_dir / 'pretrain' / 'last.pt'}"]
    result = train(load_config(CONFIG, overrides))
    trained = time.perf_counter() - clock0
    last = torch.load(result.run_dir / "last.pt", map_location="cpu", weights_only=True)
    metrics = score_checkpoint(result.run_dir / f"{arm.score}.pt", data)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = [[round(r["time"] - started, 1), r["AP"]] for r in rows if r["kind"] == "val" and "AP" in r]
    return {
        "study": study.name, "arm": arm.name, "seed": spec["seed"],
        "AP": metrics["AP"], "AP50": metrics["AP50"], "AP_small": metrics["AP_small"],
        "steps": int(last["train_state"]["step"]),
        # wall-clock minutes from the run's start to the end of training (pretraining included): what
        # early stopping saves; the trainer's own budget clock, which excludes start-up, beside it
        "minutes": trained / 60,
        "trainer_s": round(float((last["train_state"].get("time_budget") or {}).get("elapsed", 0.0)), 1),
        "status": result.status, "scored": f"{arm.score}.pt",
        "wall_s": round(time.perf_counter() - clock0, 1), "train_wall_s": round(trained, 1),
        "budget_s": seconds, "curve": curve,
        "commit": spec["commit"], "data": str(data),
        "machine": {**spec["machine"], "threads": spec["threads"], "parallel": spec["parallel"],
                    "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------- a study


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{number}: not a JSON line ({exc}); remove or repair it") from None
    return records


def pending_jobs(study: Study, seeds: list[int], done: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """(arm, seed) pairs still to run, seed-major: every arm's seed 0, then every arm's seed 1..."""
    return [(arm.name, seed) for seed in seeds for arm in study.arms if (arm.name, seed) not in done]


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _machine() -> dict[str, Any]:
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__}


def run_study(study: Study, *, seeds: list[int], seconds: float, data: Path, out: Path, parallel: int,
              threads: int, eval_every: int, crops: Path | None) -> list[dict[str, Any]]:
    """Run what the results file does not hold yet, ``parallel`` at a time; every record of the study."""
    results = out / "results.jsonl"
    records = [r for r in read_results(results) if r["study"] == study.name]
    other = sorted({(r["budget_s"], r["data"]) for r in records} - {(seconds, str(data))})
    if other:
        raise SystemExit(f"{results}: holds runs of {study.name} with another budget or data set ({other}); "
                         "give another --out, or the same --minutes and --data")
    jobs = pending_jobs(study, seeds, {(r["arm"], int(r["seed"])) for r in records})
    print(f"{study.name}: {len(jobs)} runs to do ({len(records)} done), {seconds:g} s each, {parallel} at a "
          f"time at {threads} thread(s); results in {results}", flush=True)
    common = {"study": study.name, "seconds": seconds, "data": str(data), "threads": threads,
              "parallel": parallel, "eval_every": eval_every, "crops": str(crops) if crops else None,
              "commit": _commit(), "machine": _machine()}
    running: list[tuple[str, int, Path, subprocess.Popen]] = []
    failures = []
    while jobs or running:
        while jobs and len(running) < parallel:
            arm, seed = jobs.pop(0)
            run_dir = out / "runs" / arm.replace(" ", "_").replace("/", "-") / f"seed{seed}"
            if run_dir.exists():  # a run cut short earlier: it starts again from nothing
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            spec = {**common, "arm": arm, "seed": seed, "run_dir": str(run_dir)}
            (run_dir / "job.json").write_text(json.dumps(spec))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            with open(run_dir / "job.log", "w") as log:
                process = subprocess.Popen([sys.executable, "-m", "benchmarks.ablation", "--job",
                                            str(run_dir / "job.json")], cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)
            print(f"  start  {arm} / seed {seed} (load {os.getloadavg()[0]:.1f})", flush=True)
            running.append((arm, seed, run_dir, process))
        time.sleep(0.5)
        for item in [r for r in running if r[3].poll() is not None]:
            running.remove(item)
            arm, seed, run_dir, process = item
            if process.returncode != 0 or not (run_dir / "result.json").is_file():
                failures.append(f"{arm} / seed {seed}: exit code {process.returncode}, "
                                f"see {run_dir / 'job.log'}")
                print(f"  FAILED {failures[-1]}", flush=True)
                continue
            record = json.loads((run_dir / "result.json").read_text())
            with open(results, "a") as f:  # one writer (this process), one whole line per run
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            records.append(record)
            print(f"  done   {arm} / seed {seed}: AP {record['AP']:.3f} AP50 {record['AP50']:.3f} "
                  f"{record['steps']} steps, {record['wall_s']:.0f} s", flush=True)
    if failures:
        raise SystemExit("runs failed (the study resumes them when started again):\n  "
                         + "\n  ".join(failures))
    return records


def describe(study: Study, records: list[dict[str, Any]], command: str) -> str:
    """The LESSONS.md block of a study: its command, table and where and how it ran."""
    loads = [v for r in records for v in (r["machine"]["load_start"], r["machine"]["load_end"])]
    machines = sorted({f"{r['machine']['host']} ({r['machine']['cpus']} CPUs, {r['machine']['processor']}, "
                       f"torch {r['machine']['torch']})" for r in records})
    setups = sorted({f"{r['machine']['parallel']} at a time, {r['machine']['threads']} thread(s) each"
                     for r in records})
    budgets = sorted({f"{r['budget_s'] / 60:.3g} min" for r in records})
    lines = [f"`{command}`", "", study_table(records, [a.name for a in study.arms], study.baseline), ""]
    if records:
        lines.append(f"{len(records)} runs; commit {', '.join(sorted({r['commit'] for r in records}))}; "
                     f"budget {', '.join(budgets)}; {'; '.join(machines)}; {'; '.join(setups)}; load average "
                     f"(1 min) {min(loads):.1f}-{max(loads):.1f} during the runs; finished "
                     f"{min(r['finished'] for r in records)} to {max(r['finished'] for r in records)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def _smoke_data(out: Path) -> Path:
    data = out / "data"
    if not (data / "val" / "annotations.json").is_file():
        from vision.data.synthetic import make_shapes

        make_shapes("detection", data, num_images=40, seed=0, image_size=(96, 128), val_fraction=0.2)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", choices=sorted(STUDIES), help="the study to run or report")
    parser.add_argument("--minutes", type=float, default=20.0, help="each run's train.time_budget")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (at least 3 for a study)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the CPUs / --parallel)")
    parser.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (the curve)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "realset", help="the real-imagery set")
    parser.add_argument("--out", type=Path, help="results folder (default runs/ablation/<study>)")
    parser.add_argument("--no-run", action="store_true", help="only report what the results file holds")
    parser.add_argument("--markdown", action="store_true", help="print the LESSONS.md block")
    parser.add_argument("--plot", nargs="?", const="", metavar="PNG",
                        help="write the AP-over-time plot (default docs/lessons/<study>.png)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{len(SMOKE.arms)} arms, {SMOKE_SEEDS} seeds, {SMOKE_SECONDS:g} s each on "
                        "synthetic shapes")
    parser.add_argument("--list", action="store_true", help="list the studies and their arms")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args(argv)

    if args.job:
        spec = json.loads(args.job.read_text())
        record = run_job(spec)
        target = Path(spec["run_dir"]) / "result.json"
        target.with_suffix(".tmp").write_text(json.dumps(record))
        target.with_suffix(".tmp").replace(target)
        return 0
    if args.list:
        for study in STUDIES.values():
            print(f"{study.name}: {study.question}")
            for arm in study.arms:
                extra = f" (pretrain: {arm.pretrain})" if arm.pretrain else ""
                print(f"  {arm.name}{' [baseline]' if arm.name == study.baseline else ''}: "
                      f"{' '.join(arm.overrides) or '(the recipe)'}{extra}")
        return 0
    if args.smoke:
        study, seconds, seeds = SMOKE, SMOKE_SECONDS, SMOKE_SEEDS
        out = args.out or ROOT / "runs" / "ablation" / "smoke"
        data, parallel = _smoke_data(out), max(args.parallel, 2)
    elif args.study:
        study, seconds, seeds = STUDIES[args.study], args.minutes * 60, args.seeds
        out, data, parallel = args.out or ROOT / "runs" / "ablation" / study.name, args.data, args.parallel
    else:
        parser.error("name a study (or --smoke, --list)")
    threads = args.threads or max(1, (os.cpu_count() or 1) // parallel)
    out.mkdir(parents=True, exist_ok=True)
    command = ("python -m benchmarks.ablation --smoke" if args.smoke else
               f"python -m benchmarks.ablation {study.name} --minutes {args.minutes:g} --seeds {seeds} "
               f"--parallel {parallel} --threads {threads}"
               + (f" --eval-every {args.eval_every}" if args.eval_every != 1 else "")
               + (f" --data {args.data}" if args.data != ROOT / "runs" / "realset" else "")
               + (f" --out {args.out}" if args.out else ""))
    if args.no_run:
        records = [r for r in read_results(out / "results.jsonl") if r["study"] == study.name]
    else:
        crops = None
        if not args.smoke and not (data / "val" / "annotations.json").is_file():
            from benchmarks.realset import build_realset

            build_realset(data, seed=0)
        if any(a.pretrain == "crops" for a in study.arms):
            from benchmarks.realset_crops import build_classification_set

            crops = data.with_name(data.name + "_cls")
            if not (crops / "val").is_dir():
                build_classification_set(crops, seed=0)
        records = run_study(study, seeds=list(range(seeds)), seconds=seconds, data=data, out=out,
                            parallel=parallel, threads=threads, eval_every=args.eval_every, crops=crops)
    print()
    print(describe(study, records, command) if args.markdown else
          study_table(records, [a.name for a in study.arms], study.baseline))
    if args.plot is not None:
        target = Path(args.plot) if args.plot else ROOT / "docs" / "lessons" / f"{study.name}.png"
        print(f"plot: {plot_study(records, [a.name for a in study.arms], study.question, target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
