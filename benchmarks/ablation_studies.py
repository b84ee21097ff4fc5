"""The ablation studies as data: study name -> its baseline arm and its arms, each arm a list of config
overrides on configs/detection/faster_rcnn_r18_fpn_cpu.yaml (benchmarks/ablation.py runs them).

Every arm is reachable from a config file: the overrides below are what a user would write (as
``key=value`` on the command line or as YAML), and tests/test_ablation.py loads each one. The recipe's own
settings are the baselines, so each study reads as "the recipe, with one thing changed".

What each toggle reaches (and the test that checks it): GroupNorm in the heads, dropout in the box head,
batch norm frozen, mosaic, one-cycle and patience under a budget (tests/test_study_options.py); anchors
fitted to the data (tests/test_anchor_fit.py); bfloat16 autocast (tests/test_engine_amp.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Arm", "Study", "STUDIES", "SMOKE", "study_named"]


@dataclass(frozen=True)
class Arm:
    """One setting of a study. ``pretrain`` names a classification run done first, inside the arm's own
    budget (``pretrain_share`` of it), whose trunk the detector starts from; ``score`` is the checkpoint
    scored at the end: ``last`` (the run's end) or ``best`` (what early stopping keeps)."""

    name: str
    overrides: tuple[str, ...] = ()
    pretrain: str | None = None  # "crops": benchmarks/realset_crops.py's set, configs/classification/...
    pretrain_share: float = 0.25
    score: str = "last"


@dataclass(frozen=True)
class Study:
    name: str
    question: str  # what the study answers, one line (LESSONS.md's heading)
    baseline: str  # the arm every other one is compared with
    arms: tuple[Arm, ...]
    overrides: tuple[str, ...] = field(default=())  # common to every arm

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        names = ", ".join(a.name for a in self.arms)
        raise KeyError(f"study {self.name!r} has no arm {name!r}; arms: {names}")


FLIP = "{name: HorizontalFlip, p: 0.5}"
COLOUR = "{name: ColorJitter, brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.02, p: 0.8}"
# four training images in one (YOLOv4), at the recipe's longest side; grey where no image covers
MOSAIC = "{name: Mosaic, p: 0.5, target_size: [384, 384], cell_shape: [384, 384], fill: 128}"
SCALES = "model.min_size=[224, 256, 288]"  # multi-scale training: one short side per image; tests use 288


def _lrs(optimizer: str, lrs: tuple[float, ...], *extra: str) -> tuple[Arm, ...]:
    return tuple(Arm(f"{optimizer} {lr:g}", (f"train.optimizer={optimizer}", f"train.lr={lr}", *extra))
                 for lr in lrs)


STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("augmentation", "What each augmentation adds: none, flip, scale jitter, colour jitter, mosaic",
          "flip", (
              Arm("none", ("data.train.transforms=[]",)),
              Arm("flip", (f"data.train.transforms=[{FLIP}]",)),
              Arm("flip + scale", (f"data.train.transforms=[{FLIP}]", SCALES)),
              Arm("flip + scale + colour", (f"data.train.transforms=[{FLIP}, {COLOUR}]", SCALES)),
              Arm("flip + scale + colour + mosaic", (f"data.train.transforms=[{MOSAIC}, {FLIP}, {COLOUR}]",
                                                     SCALES)),
          )),
    Study("normalisation", "Batch norm trained or frozen, GroupNorm in the heads, dropout in the box head",
          "BN trained", (
              Arm("BN trained", ("model.frozen_bn=false",)),
              Arm("BN frozen", ("model.frozen_bn=true",)),
              Arm("GN in the heads", ("model.rpn.norm=gn", "model.roi.norm=gn")),
              Arm("box-head dropout 0.5", ("model.roi.mlp_dropout=0.5",)),
          )),
    Study("optimiser", "SGD with momentum, Adam and AdamW, each at three learning rates",
          "adamw 0.001", (
              *_lrs("sgd", (0.01, 0.02, 0.04), "train.momentum=0.9"),
              *_lrs("adam", (0.0003, 0.001, 0.003)),
              *_lrs("adamw", (0.0003, 0.001, 0.003)),
          )),
    Study("schedule", "Step, cosine, cyclical (triangular) and one-cycle learning rates in the same budget",
          "cosine", (
              Arm("step", ("train.scheduler=multistep", "train.milestones=[8, 11]", "train.gamma=0.1")),
              Arm("cosine", ("train.scheduler=cosine",)),
              Arm("cyclic", ("train.scheduler=cyclic", "train.cycle_epochs=4", "train.min_lr_ratio=0.1")),
              Arm("one-cycle", ("train.scheduler=onecycle", "train.pct_start=0.3", "train.warmup_iters=0")),
          )),
    Study("early_stopping",
          "Stopping on validation AP with patience against the full budget: time saved, AP lost",
          "full budget", (
              Arm("full budget", ()),
              Arm("patience 1", ("train.patience=1",), score="best"),
              Arm("patience 2", ("train.patience=2",), score="best"),
          )),
    Study("anchors", "The fixed octave anchors against anchors fitted to the training boxes",
          "fixed", (
              Arm("fixed", ()),
              Arm("auto", ("model.rpn.anchor_sizes=auto",)),
          )),
    Study("precision", "float32 against bfloat16 autocast: more steps in the budget, and the AP they buy",
          "float32", (
              Arm("float32", ("train.amp=false",)),
              Arm("bfloat16", ("train.amp=true", "train.amp_dtype=bfloat16")),
          )),
    Study("budget_shape", "The budget spent on image size, batch size or steps",
          "256 px, batch 4", tuple(
              Arm(f"{side} px, batch {batch}",
                  (f"model.min_size={side}", f"model.max_size={side * 3 // 2}", f"train.batch_size={batch}"))
              for side in (256, 320, 384) for batch in (4, 2)
          )),
    Study("transfer",
          "From scratch, from a trunk pretrained on crops of the training objects, from the shapes "
          "classifier's trunk", "scratch", (
              Arm("scratch", ()),
              Arm("crops-pretrained trunk", (), pretrain="crops"),
              Arm("shapes classifier trunk", ("model.backbone_weights=weights/classifier_shapes.pt",)),
          )),
    # issue 26's question: the shipped real-photo classifier (weights/build.sh classifier_real, trained on
    # crops of the training split's objects before the detector's budget starts, as an ImageNet trunk is)
    Study("transfer_real",
          "From scratch, or from the shipped real-photo classifier's trunk",
          "scratch", (
              Arm("scratch", ()),
              Arm("real-photo classifier trunk", ("model.backbone_weights=weights/classifier_real.pt",)),
          )),
)}

# `benchmarks/ablation.py --smoke`: the machinery end to end on synthetic shapes in seconds (not a study)
SMOKE = Study("smoke", "The machinery, end to end (synthetic shapes, 20-second budget)", "cosine", (
    Arm("cosine", ("train.scheduler=cosine",)),
    Arm("one-cycle", ("train.scheduler=onecycle", "train.warmup_iters=0")),
), overrides=("model.min_size=96", "model.max_size=128", "data.workers=0", "train.log_every=5"))


def study_named(name: str) -> Study:
    if name == SMOKE.name:
        return SMOKE
    if name not in STUDIES:
        raise KeyError(f"no study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]
