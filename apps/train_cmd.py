"""`visiondet train CONFIG [key=value ...]`: train any task from an experiment file.

Examples::

    visiondet train configs/classification/resnet18_shapes.yaml train.epochs=2 device=cpu
    visiondet train --resume runs/classification/exp3            # continue an interrupted run
    visiondet train configs/...yaml weights=runs/.../best.pt     # fine-tune from another run's weights
    torchrun --nproc_per_node 2 -m apps.cli train configs/...yaml # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]",
                        help="experiment YAML file, then dotted overrides such as train.epochs=2 "
                             "data.train.root=DIR output_dir=DIR device=cpu seed=1 resume=true weights=CKPT")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (or a last.pt) with everything restored; its saved "
                             "config is used, changed by any CONFIG and overrides given")


def run(args: argparse.Namespace) -> int:
    import yaml

    from apps.config import ConfigError
    from apps.train import TrainingError, train
    from vision.checkpoint import CheckpointError

    config = next((a for a in args.args if "=" not in a), None)
    overrides = [a for a in args.args if a != config]
    extra = [a for a in args.args if "=" not in a and a != config]
    try:
        from apps.config import load_config

        if extra:
            raise ConfigError(f"expected one CONFIG file and key=value overrides, got also {extra}")
        base = None
        if args.resume is not None:
            run_dir = Path(args.resume)
            run_dir = run_dir.parent if run_dir.is_file() else run_dir
            saved = run_dir / "config.yaml"
            if not saved.is_file():
                raise ConfigError(f"--resume: {saved}: no such file (is {run_dir} a run folder?)")
            base = yaml.safe_load(saved.read_text()) or {}
            base.update(resume=str(run_dir), output_dir=str(run_dir))
        elif config is None:
            raise ConfigError("give a CONFIG file (see configs/) or --resume RUN_DIR")
        exp = load_config(config, overrides, base=base)
        result = train(exp)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        best = f", best {result.best_metric:.4f}" if result.best_metric is not None else ""
        print(f"{result.status} after {result.epochs_done} epochs{best}; run folder {result.run_dir}")
    return 0
