#!/usr/bin/env bash
# Reproduce the shipped default weights and example images with the project's own commands:
# synthetic shapes data (`visiondet synth`), training with the shipped small CPU configs (`visiondet train`),
# then weights/slim.py (drops the resume state, stores float16, checks the slim copy against the original).
#
#   bash weights/build.sh classifier|segmenter|faster_rcnn|fast_rcnn|rcnn|examples ...   (or: all)
#   bash weights/build.sh classifier_real|segmenter_real|faster_rcnn_real|examples_real  (or: real)
#
# The *_real models train on the real-imagery sets (benchmarks/realset.py, seed 0: package-bundled
# photographs) with the CPU recipes for REAL_BUDGET each (default 20m, the budget the real-imagery benchmarks
# measure; the schedule is laid over the steps that fit, so OMP_NUM_THREADS and the machine's load change
# what a run reaches), and are stored with int8 conv/linear weights (weights/slim.py --int8) to stay
# under 15 MB. The classifier's "none of these" threshold and the detectors' score threshold are calibrated on
# their validation splits at the end of training.
#
# Everything intermediate goes to runs/default_weights/ (git-ignored). Each training run is niced and uses the
# CPU; extra `key=value` overrides for every `visiondet train` can be given in TRAIN_OVERRIDES.
set -euo pipefail
cd "$(dirname "$0")/.."
VD="${VISIONDET:-.venv/bin/visiondet}"
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/default_weights}"
read -r -a EXTRA <<< "${TRAIN_OVERRIDES:-}"
export NO_ALBUMENTATIONS_UPDATE=1

run() { echo "+ $*"; nice -n 10 "$@"; }

det_data() {  # one detection set for the three detectors (seed 0, 128-160 px as the configs expect)
  [ -f "$OUT/shapes_det/val/annotations.json" ] ||
    run "$VD" synth --task detection --out "$OUT/shapes_det" --num-images 2000 --image-size 128 160 --seed 0
}
det_paths=(data.train.images="$OUT/shapes_det/train/images" data.train.annotations="$OUT/shapes_det/train/annotations.json"
           data.val.images="$OUT/shapes_det/val/images" data.val.annotations="$OUT/shapes_det/val/annotations.json")

classifier() {
  run "$VD" synth --task classification --out "$OUT/shapes_cls" --num-images 4000 --seed 0
  run "$VD" train configs/classification/resnet18_shapes.yaml data.train.root="$OUT/shapes_cls/train" \
    data.val.root="$OUT/shapes_cls/val" output_dir="$OUT/classifier" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/classifier/best.pt" weights/classifier_shapes.pt --check-images "$OUT/shapes_cls/val"
}

segmenter() {
  run "$VD" synth --task segmentation --out "$OUT/shapes_seg" --num-images 2000 --image-size 64 96 --seed 0
  run "$VD" train configs/segmentation/deeplabv3plus_r18_shapes_cpu.yaml \
    data.train.images="$OUT/shapes_seg/train/images" data.train.annotations="$OUT/shapes_seg/train/annotations.json" \
    data.val.images="$OUT/shapes_seg/val/images" data.val.annotations="$OUT/shapes_seg/val/annotations.json" \
    output_dir="$OUT/segmenter" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/segmenter/best.pt" weights/deeplabv3plus_shapes.pt --check-images "$OUT/shapes_seg/val/images"
}

faster_rcnn() {
  det_data
  run "$VD" train configs/detection/faster_rcnn_r18_fpn_shapes.yaml "${det_paths[@]}" output_dir="$OUT/faster_rcnn" \
    device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/faster_rcnn/best.pt" weights/faster_rcnn_shapes.pt --check-images "$OUT/shapes_det/val/images"
}

fast_rcnn() {
  det_data
  run "$VD" train configs/detection/fast_rcnn_r18_fpn_shapes.yaml "${det_paths[@]}" output_dir="$OUT/fast_rcnn" \
    model.proposals.cache_dir="$OUT/proposal_cache" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/fast_rcnn/best.pt" weights/fast_rcnn_shapes.pt --check-images "$OUT/shapes_det/val/images"
}

rcnn() {
  det_data
  run "$VD" train configs/detection/rcnn_r18_shapes.yaml "${det_paths[@]}" output_dir="$OUT/rcnn" \
    model.proposals.cache_dir="$OUT/proposal_cache" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/rcnn/final.pt" weights/rcnn_shapes.pt --check-images "$OUT/shapes_det/val/images"
}

real_data() {  # the real-imagery scenes: images, COCO boxes and index masks in one tree; classification crops
  [ -f "$OUT/realset/val/annotations.json" ] && [ -d "$OUT/realset/val/masks" ] ||
    run "$PY" -m benchmarks.realset --task segmentation --out "$OUT/realset" --seed 0
  [ -d "$OUT/realset_cls/val" ] || run "$PY" -m benchmarks.realset --task classification --out "$OUT/realset_cls" --seed 0
}
REAL_BUDGET="${REAL_BUDGET:-20m}"
# the categories the real-imagery sets cut from one photograph each (one instance: that cat, that cup...),
# read from benchmarks/realset_sources.py; slim.py records them so the demo says so
single_photo() {
  "$PY" -c 'from benchmarks.realset import CATEGORIES; from benchmarks.realset_sources import load_objects
print(",".join(CATEGORIES[c] for c, pool in sorted(load_objects().items()) if len(pool) == 1))'
}

classifier_real() {
  real_data
  run "$VD" train configs/classification/resnet18_real_cpu.yaml data.train.root="$OUT/realset_cls/train" \
    data.val.root="$OUT/realset_cls/val" data.name="real-imagery crops (benchmarks/realset.py)" \
    train.time_budget="$REAL_BUDGET" output_dir="$OUT/classifier_real" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/classifier_real/best.pt" weights/classifier_real.pt --int8 --max-mb 15 \
    --single-photo "$(single_photo)" --check-images "$OUT/realset_cls/val" --limit 200
}

segmenter_real() {
  real_data
  run "$VD" train configs/segmentation/deeplabv3plus_r18_real_cpu.yaml \
    data.train.images="$OUT/realset/train/images" data.train.masks="$OUT/realset/train/masks" \
    data.val.images="$OUT/realset/val/images" data.val.masks="$OUT/realset/val/masks" \
    data.name="real-imagery scenes (benchmarks/realset.py)" train.time_budget="$REAL_BUDGET" \
    output_dir="$OUT/segmenter_real" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/segmenter_real/best.pt" weights/deeplabv3plus_real.pt --int8 --max-mb 15 \
    --single-photo "$(single_photo)" --check-images "$OUT/realset/val/images"
}

faster_rcnn_real() {
  real_data
  run "$VD" train configs/detection/faster_rcnn_r18_fpn_cpu.yaml \
    data.train.images="$OUT/realset/train/images" data.train.annotations="$OUT/realset/train/annotations.json" \
    data.val.images="$OUT/realset/val/images" data.val.annotations="$OUT/realset/val/annotations.json" \
    data.name="real-imagery scenes (benchmarks/realset.py)" train.time_budget="$REAL_BUDGET" \
    output_dir="$OUT/faster_rcnn_real" device=cpu "${EXTRA[@]}"
  run "$PY" weights/slim.py "$OUT/faster_rcnn_real/best.pt" weights/faster_rcnn_real.pt --int8 --max-mb 15 \
    --single-photo "$(single_photo)" --check-images "$OUT/realset/val/images"
}

examples() {  # a few scenes the detectors have never seen (another seed), plus two single shapes
  run "$VD" synth --task detection --out "$OUT/examples_det" --num-images 12 --image-size 192 256 --seed 2024
  run "$VD" synth --task classification --out "$OUT/examples_cls" --num-images 6 --image-size 96 --seed 2024
  run "$PY" weights/pick_examples.py "$OUT/examples_det" "$OUT/examples_cls" weights/examples
}

examples_real() {  # photographs and validation composites no real-photo model trained on (weights/README.md)
  run "$PY" weights/pick_real_examples.py weights/examples_real
}

[ $# -gt 0 ] || { echo "usage: bash weights/build.sh classifier|segmenter|faster_rcnn|fast_rcnn|rcnn|examples|all|classifier_real|segmenter_real|faster_rcnn_real|examples_real|real" >&2; exit 2; }
for part in "$@"; do
  if [ "$part" = all ]; then
    classifier; segmenter; faster_rcnn; fast_rcnn; rcnn; examples
  elif [ "$part" = real ]; then
    classifier_real; segmenter_real; faster_rcnn_real; examples_real
  else
    "$part"
  fi
done
