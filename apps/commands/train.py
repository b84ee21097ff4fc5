"""`visiondet train CONFIG [key=value ...]`: train any task from an experiment file.

Examples::

    visiondet train configs/classification/resnet18_shapes.yaml train.epochs=2 device=cpu
    visiondet train --resume runs/classification/exp3            # continue an interrupted run
    visiondet train --resume runs/classification/exp3 --force train.epochs=20   # ... with a longer schedule
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
                        help="experiment YAML file, then dotted overrides such as train.time_budget=20m "
                             "train.batch_size=4 data.train.images=DIR output_dir=DIR device=cpu seed=1 "
                             "weights=CKPT")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (or a last.pt) with everything restored, with its "
                             "saved config.yaml (the same as the override resume=RUN_DIR)")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: accept a CONFIG or overrides that change the saved data, model "
                             "or schedule (resume_force=true); device, workers, logging and checkpoint "
                             "settings may always change")


def run(args: argparse.Namespace) -> int:
    from apps.config import ConfigError
    from apps.engine.loader import UnreadableImageError
    from apps.engine.trainer import TrainingError, train
    from vision.checkpoint import CheckpointError

    config = next((a for a in args.args if "=" not in a), None)
    overrides = [a for a in args.args if a != config]
    extra = [a for a in args.args if "=" not in a and a != config]
    try:
        from apps.config import load_config, parse_overrides
        from apps.engine.resume import saved_config

        if extra:
            raise ConfigError(f"expected one CONFIG file and key=value overrides, got also {extra}")
        if args.force:
            overrides.append("resume_force=true")
        run_dir = _resumed_run(args.resume, parse_overrides(overrides))
        base = None
        if run_dir is not None:  # the run's own config.yaml is the base: CONFIG and overrides change it
            base = saved_config(run_dir)
            base.update(resume=str(run_dir), output_dir=str(run_dir))
        elif config is None:
            raise ConfigError("give a CONFIG file (see configs/) or --resume RUN_DIR")
        exp = load_config(config, overrides, base=base)
        result = train(exp)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, UnreadableImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        best = f", best {result.best_metric:.4f}" if result.best_metric is not None else ""
        skipped = (f"; {result.skipped_images} unreadable images skipped (listed in "
                   f"{result.run_dir / 'skipped_images.txt'})" if result.skipped_images else "")
        print(f"{result.status} after {result.epochs_done} epochs{best}; run folder {result.run_dir}"
              f"{skipped}")
    return 0


def _resumed_run(flag: str | None, overrides: dict) -> Path | None:
    """The run folder to continue: ``--resume DIR``, ``resume=DIR``, or ``resume=true`` with
    ``output_dir=DIR``; None otherwise (``resume=true`` alone is left to the trainer, which lists runs)."""
    resume = flag if flag is not None else overrides.get("resume")
    if isinstance(resume, str) and resume:
        path = Path(resume)
    elif resume is True and isinstance(overrides.get("output_dir"), str):
        path = Path(overrides["output_dir"])
    else:
        return None
    return path.parent if path.is_file() else path
