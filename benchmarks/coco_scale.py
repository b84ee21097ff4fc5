"""COCO scale: a COCO-sized annotation file, and what visiondet does with it against the references.

    nice -n 10 .venv/bin/python benchmarks/coco_scale.py                    # 118,287 images, 860,001 boxes
    .venv/bin/python benchmarks/coco_scale.py --images 20000 --only construct,eval   # quick look
    .venv/bin/python benchmarks/coco_scale.py --images 1000000 --only construct      # a larger set

The script writes (once, then reuses) ``--workdir``/N/: ``train.json``, a boxes-only instances file shaped
like COCO train2017 (N images of 640x480, 640x427, 480x640 or 427x640 pixels, 7.27 boxes per image of
COCO-like sizes, 80 non-contiguous category ids, about 1% crowd), and an image folder whose N file names are
hard links to four small real JPEGs cut from scikit-learn's sample photos (no 18 GB of images). Then:

(a) construction: ``CocoDetection(images, train.json, cache=None)`` against
    ``pycocotools.coco.COCO(train.json)``, each in a fresh process: wall and CPU time, resident memory
    after it (RSS) and the peak (VmHWM), both also as growth over the process's RSS just before (imports
    done), which is what the ratios compare; then with the on-disk cache (``vision.data.cococache``):
    the first process, which builds the entry, and a second one, which maps it (any other DDP rank);
(b) DataLoader memory: 4 workers, batches of 2 in random order, 2,000 batches; PSS (proportional set
    size, so pages shared by several processes count once in the sum) of the main process and its
    workers from ``/proc/<pid>/smaps_rollup``, after the first batch and after the last;
(c) ``visiondet data check --headers-only`` on the set, wall and CPU time (a fresh process, what a user
    runs), and the same with ``--no-anchors`` (the anchor section reads the file a second time);
(d) evaluation: the first 5,000 images as ground truth, 100 detections each (jittered ground truth and
    random boxes, random scores), ``evaluate_coco`` with ``backend="pycocotools"`` (the reference) and
    ``backend="faster"`` (faster-coco-eval), wall time of each call and the largest difference over every
    returned metric (12 COCO numbers, AP and AP50 of each class);
(e) ``model.rpn.anchor_sizes: auto`` as training starts it (``DetectionTask.fit_to_data`` on the dataset,
    mapped from the cache as a DDP rank maps it): peak RSS growth and time, against the former way (a second
    ``json.load`` of the file, then ``coco_boxes``; its peak growth alone).

Figures and ratios come out in one table. Goals (issue 19): construction at most 1.3x pycocotools' time
and memory, worker PSS growth under 200 MB, data check under 2 minutes on 2 cores, evaluation at least 3x
faster with every metric within 1e-4; issue 29: the anchor step's peak growth under 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

COCO_IMAGES, COCO_BOXES = 118_287, 860_001
# COCO's 80 category ids: 1..90 with these ten left out
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
SIZES = ((640, 480), (640, 427), (480, 640), (427, 640))  # (width, height), the common COCO shapes
EVAL_IMAGES, DETECTIONS_PER_IMAGE = 5_000, 100
WARM_BATCHES = 100  # by then every worker has decoded and sent batches: its buffers exist
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the packages, before this folder's detection.py benchmark script


# ---- the data set ----------------------------------------------------------------------------------------


def write_jpegs(folder: Path) -> list[Path]:
    """Four real JPEGs, one per size in SIZES, cut and resized from scikit-learn's sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photos
    paths = []
    for k, (w, h) in enumerate(SIZES):
        path = folder / f"_source_{w}x{h}.jpg"
        Image.fromarray(photos[k % 2]).resize((w, h)).save(path, quality=85)
        paths.append(path)
    return paths


def boxes_for(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """COCO-like [x, y, w, h]: side log-uniform from 4 px to the image, aspect ratio log-normal, inside."""
    short = np.minimum(widths, heights)
    side = np.exp(rng.uniform(np.log(4.0), np.log(short)))
    aspect = np.exp(rng.normal(0.0, 0.5, len(side)))
    w = np.clip(side * np.sqrt(aspect), 2.0, widths)
    h = np.clip(side / np.sqrt(aspect), 2.0, heights)
    x = rng.uniform(0.0, 1.0, len(side)) * (widths - w)
    y = rng.uniform(0.0, 1.0, len(side)) * (heights - h)
    return np.round(np.stack([x, y, w, h], axis=1), 2)


def write_dataset(folder: Path, num_images: int, seed: int = 0) -> dict[str, Path]:
    """train.json, val.json (the first EVAL_IMAGES images), results.json (detections on val) and images/."""
    done = folder / "done.json"
    paths = {name: folder / f"{name}.json" for name in ("train", "val", "results")}
    paths["images"] = folder / "images"
    paths["cache"] = folder / "table_cache"  # CocoDetection(cache=...) entries, made by the measurements
    if done.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    paths["images"].mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    num_boxes = round(num_images * COCO_BOXES / COCO_IMAGES)
    # non-contiguous image and annotation ids, like COCO's
    image_ids = np.sort(rng.choice(num_images * 5, num_images, replace=False)) + 1
    shape = rng.integers(0, len(SIZES), num_images)
    widths = np.array([w for w, _ in SIZES])[shape]
    heights = np.array([h for _, h in SIZES])[shape]
    owner = np.sort(rng.integers(0, num_images, num_boxes))  # image index of each box
    boxes = boxes_for(rng, widths[owner].astype(float), heights[owner].astype(float))
    ann_ids = np.sort(rng.choice(num_boxes * 3, num_boxes, replace=False)) + 1
    categories = np.array(CATEGORY_IDS)[rng.integers(0, len(CATEGORY_IDS), num_boxes)]
    crowd = rng.random(num_boxes) < 0.01
    names = [f"{int(i):012d}.jpg" for i in image_ids]
    sources = write_jpegs(folder)
    for name, k in zip(names, shape.tolist(), strict=True):
        target = paths["images"] / name
        if not target.exists():
            os.link(sources[k], target)
    # the fields COCO's own files carry, so the file has COCO's size (about 167 MB at 118,287 images)
    images = [
        {"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
         "height": int(h), "width": int(w), "date_captured": "2013-11-14 16:28:13",
         "flickr_url": f"http://farm4.staticflickr.com/4/{int(i)}_0123456789_z.jpg", "id": int(i)}
        for name, w, h, i in zip(names, widths, heights, image_ids, strict=True)
    ]
    order = rng.permutation(num_boxes)  # COCO's annotations are not grouped by image
    area = boxes[:, 2] * boxes[:, 3] * rng.uniform(0.5, 0.9, num_boxes)  # a mask's area: under the box's
    anns = [
        {"segmentation": [], "area": float(area[j]), "iscrowd": int(crowd[j]),
         "image_id": int(image_ids[owner[j]]), "bbox": boxes[j].tolist(), "category_id": int(categories[j]),
         "id": int(ann_ids[j])}
        for j in order.tolist()
    ]
    cats = [{"supercategory": "thing", "id": c, "name": f"class_{c}"} for c in CATEGORY_IDS]
    info = {"description": f"visiondet COCO-scale benchmark, {num_images} images", "version": "1.0"}
    write_json(paths["train"], {"info": info, "licenses": [], "images": images, "annotations": anns,
                                "categories": cats})
    val_ids = set(int(i) for i in image_ids[:EVAL_IMAGES])
    val_anns = [a for a in anns if a["image_id"] in val_ids]
    write_json(paths["val"], {"info": info, "licenses": [], "images": images[:EVAL_IMAGES],
                              "annotations": val_anns, "categories": cats})
    write_json(paths["results"], make_detections(rng, images[:EVAL_IMAGES], val_anns))
    done.write_text(json.dumps({"images": num_images, "boxes": num_boxes}))
    return paths


def make_detections(rng: np.random.Generator, images: list[dict], anns: list[dict]) -> list[dict]:
    """100 detections per image: each ground-truth box jittered (a true positive at some IoU), the rest
    random boxes of random classes; scores random, a little higher for the jittered ones."""
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    results = []
    for img in images:
        gt = by_image.get(img["id"], [])[:DETECTIONS_PER_IMAGE]
        n_random = DETECTIONS_PER_IMAGE - len(gt)
        w, h = float(img["width"]), float(img["height"])
        rand = boxes_for(rng, np.full(n_random, w), np.full(n_random, h))
        boxes = [g["bbox"] for g in gt] + rand.tolist()
        if gt:
            sides = np.array([[b[2], b[3], b[2], b[3]] for b in boxes[:len(gt)]])
            jitter = rng.normal(0.0, 0.08, (len(gt), 4)) * sides
            boxes[:len(gt)] = np.round(np.array(boxes[:len(gt)]) + jitter, 2).tolist()
        cats = [g["category_id"] for g in gt] + rng.choice(CATEGORY_IDS, n_random).tolist()
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(gt)), rng.uniform(0.0, 0.7, n_random)])
        results += [
            {"image_id": img["id"], "category_id": int(c), "bbox": b, "score": round(float(s), 4)}
            for b, c, s in zip(boxes, cats, scores.tolist(), strict=True)
        ]
    return results


def write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# ---- measurements, each in its own process (--measure) ---------------------------------------------------


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or its peak (VmHWM, which, unlike ru_maxrss, does not
    inherit the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def measure_construct(which: str, paths: dict[str, Path]) -> dict:
    if which.startswith("ours"):
        from vision.data.coco import CocoDetection

        # "ours": parse the JSON (cache off); "ours-cache": the same file through the on-disk cache, run
        # twice: the first process builds the entry, the second (any other rank, any later run) maps it
        cache = paths["cache"] if which == "ours-cache" else None
        build = lambda: CocoDetection(paths["images"], paths["train"], cache=cache)  # noqa: E731
    else:
        import contextlib
        import io

        from pycocotools.coco import COCO

        def build():
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(str(paths["train"]))

    before = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    built = build()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = rss_mb()
    peak = rss_mb("VmHWM")
    assert built is not None
    return {"seconds": seconds, "cpu": cpu, "rss_before": before, "rss_after": after, "peak": peak}


def measure_workers(paths: dict[str, Path], batches: int, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from vision.data.coco import CocoDetection
    from vision.data.collate import detection_collate

    torch.set_num_threads(1)
    dataset = CocoDetection(paths["images"], paths["train"], cache=None)  # arrays on the heap, not mapped
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=workers,
                        collate_fn=detection_collate, generator=torch.Generator().manual_seed(0))
    me = os.getpid()
    total = lambda: sum(pss_mb(p) for p in [me, *children(me)])  # noqa: E731
    worker_total = lambda: sum(pss_mb(p) for p in children(me))  # noqa: E731
    iterator = iter(loader)
    next(iterator)
    time.sleep(1.0)  # let every worker finish starting up
    marks = {1: (total(), worker_total())}
    t0 = time.perf_counter()
    for seen in range(2, batches + 1):
        next(iterator)
        if seen in (WARM_BATCHES, batches):
            marks[seen] = (total(), worker_total())
    seconds = time.perf_counter() - t0
    del iterator
    (start, start_workers), (end, end_workers) = marks[1], marks[batches]
    warm = marks.get(WARM_BATCHES, marks[1])[0]
    return {"start": start, "warm": warm, "end": end, "growth": end - start, "growth_after_warm": end - warm,
            "workers_start": start_workers, "workers_end": end_workers, "batches": batches,
            "seconds": seconds}


def measure_check(paths: dict[str, Path], *extra: str) -> dict:
    cmd = [sys.executable, "-m", "apps.cli", "data", "check", "--annotations", str(paths["train"]),
           "--images", str(paths["images"]), "--headers-only", "--json", *extra]
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    ok = None
    try:
        ok = json.loads(proc.stdout)["ok"]
    except (json.JSONDecodeError, KeyError):
        print(proc.stderr[-2000:], file=sys.stderr)
    return {"seconds": seconds, "cpu": cpu, "exit": proc.returncode, "ok": ok}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux: ``5`` to /proc/self/clear_refs), so a peak measured
    next belongs to the step measured next, not to the dataset's construction before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_anchors(paths: dict[str, Path]) -> dict:
    """(e) ``model.rpn.anchor_sizes: auto`` as training runs it (DetectionTask.fit_to_data on the training
    dataset, mapped from the on-disk cache as every DDP rank maps it) against what it did before: a second
    ``json.load`` of the file and ``coco_boxes`` on the dicts. Peak growth over the RSS just before each."""
    import gc

    from apps.config import build_experiment
    from apps.tasks import get_task
    from apps.tasks.base import Datasets
    from detection.anchor_fit import coco_boxes
    from vision.data.coco import CocoDetection

    dataset = CocoDetection(paths["images"], paths["train"], cache=paths["cache"])
    exp = build_experiment({"task": "detection", "device": "cpu",
                            "model": {"arch": "faster_rcnn_r50_fpn",
                                      "rpn": {"anchor_sizes": "auto", "aspect_ratios": "auto"}},
                            "data": {"train": {"images": str(paths["images"]),
                                               "annotations": str(paths["train"])}, "val": None}})
    gc.collect()
    out: dict = {"peak_reset": reset_peak()}
    before, start, cpu = rss_mb(), time.perf_counter(), time.process_time()
    fitted, lines = get_task("detection").fit_to_data(exp, Datasets(dataset, None, dataset.classes))
    out.update(seconds=time.perf_counter() - start, cpu=time.process_time() - cpu, rss_before=before,
               peak=rss_mb("VmHWM"), boxes=int(lines[0].split(" training boxes")[0].rsplit(" ", 1)[1]),
               sizes=fitted.model.rpn.anchor_sizes)
    del fitted
    gc.collect()
    reset_peak()
    before, start = rss_mb(), time.perf_counter()
    with open(paths["train"], encoding="utf-8") as f:  # the former way: the whole file once more
        boxes, _ = coco_boxes(json.load(f))
    out.update(ref_seconds=time.perf_counter() - start, ref_rss_before=before, ref_peak=rss_mb("VmHWM"),
               ref_boxes=len(boxes))
    return out


def measure_eval(paths: dict[str, Path]) -> dict:
    from detection.evaluation import evaluate_coco

    results = json.loads(paths["results"].read_text())
    out: dict = {"detections": len(results)}
    metrics = {}
    for backend in ("pycocotools", "faster"):
        start, cpu = time.perf_counter(), time.process_time()
        metrics[backend] = evaluate_coco(paths["val"], results, backend=backend)
        out[backend] = time.perf_counter() - start
        out[f"{backend}_cpu"] = time.process_time() - cpu
    ref, fast = metrics["pycocotools"], metrics["faster"]
    diffs = {k: abs(ref[k] - fast.get(k, float("nan"))) for k in ref}
    worst = max(diffs, key=lambda k: diffs[k])
    out.update({"max_diff": diffs[worst], "worst_metric": worst, "metrics": len(ref), "AP": ref["AP"],
                "AP_faster": fast["AP"], "same_keys": sorted(ref) == sorted(fast)})
    return out


def run_measure(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    kind = args.measure
    if kind.startswith("construct-"):
        return measure_construct(kind.split("-", 1)[1], paths)
    if kind == "workers":
        return measure_workers(paths, args.batches, args.workers)
    if kind == "check":
        # the command as a user runs it, then without the anchor section (another reading of the file)
        return {"default": measure_check(paths), "no_anchors": measure_check(paths, "--no-anchors")}
    if kind == "eval":
        return measure_eval(paths)
    if kind == "anchors":
        return measure_anchors(paths)
    raise SystemExit(f"unknown measurement {kind!r}")


def in_fresh_process(args: argparse.Namespace, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--images", str(args.images), "--workdir", str(args.workdir),
           "--batches", str(args.batches), "--workers", str(args.workers), "--measure", kind]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{kind} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the table -------------------------------------------------------------------------------------------


def _ratio_row(label: str, ours: float, ref: float, goal: str, *, digits: int = 1, ratio: str = ".2f"
               ) -> tuple[str, str, str, str, str]:
    """A report row of a measure taken for both, with ours / reference."""
    return label, f"{ours:.{digits}f}", f"{ref:.{digits}f}", f"{ours / ref:{ratio}}x", goal


def report(args: argparse.Namespace, found: dict[str, dict]) -> str:
    nan = float("nan")
    rows = [("measure", "visiondet", "reference", "ratio", "goal")]
    if "construct" in found:
        ours, ref = found["construct"]["ours"], found["construct"]["pycocotools"]
        grow = lambda r, key: r[key] - r["rss_before"]  # noqa: E731
        rows += [
            _ratio_row("(a) construction time (s)", ours["seconds"], ref["seconds"], "<= 1.3x"),
            _ratio_row("(a) construction CPU time (s)", ours.get("cpu", nan), ref.get("cpu", nan),
                       "(load-independent)"),
            _ratio_row("(a) peak RSS growth (MB)", grow(ours, "peak"), grow(ref, "peak"), "<= 1.3x",
                       digits=0),
            _ratio_row("(a) RSS growth kept (MB)", grow(ours, "rss_after"), grow(ref, "rss_after"), "",
                       digits=0),
            ("(a) RSS after / peak (MB)", f"{ours['rss_after']:.0f} / {ours['peak']:.0f}",
             f"{ref['rss_after']:.0f} / {ref['peak']:.0f}", "", "(whole process)"),
        ]
        if "cache_map" in found["construct"]:
            build, mapped = found["construct"]["cache_build"], found["construct"]["cache_map"]
            rows += [
                _ratio_row("(a) cache: first process builds (s)", build["seconds"], ref["seconds"],
                           "(writes the .npy files)"),
                ("(a) cache: other processes map (s)", f"{mapped['seconds']:.2f}", f"{ref['seconds']:.1f}",
                 f"{mapped['seconds'] / ref['seconds']:.3f}x", "(DDP ranks, later runs)"),
                _ratio_row("(a) cache: peak RSS growth (MB)", grow(mapped, "peak"), grow(ref, "peak"),
                           "(mapped pages shared)", digits=0),
            ]
    if "workers" in found:
        w = found["workers"]
        rows += [
            (f"(b) PSS, main + {args.workers} workers (MB)", f"{w['start']:.0f} -> {w['end']:.0f}", "", "",
             ""),
            (f"(b) PSS growth over {w['batches']} batches (MB)", f"{w['growth']:.0f}", "", "",
             "< 200 MB"),
            (f"(b) PSS growth, batch {WARM_BATCHES} to {w['batches']} (MB)",
             f"{w.get('growth_after_warm', float('nan')):.0f}", "", "", "(after warm-up)"),
        ]
    if "check" in found:
        for variant, c in found["check"].items():
            flag = " --no-anchors" if variant == "no_anchors" else ""
            rows.append((f"(c) data check --headers-only{flag} (s)", f"{c['seconds']:.1f}", "", "",
                         f"< 120 s (exit {c['exit']}, ok={c['ok']})"))
            rows.append((f"(c) data check{flag}, CPU time (s)", f"{c.get('cpu', nan):.1f}", "", "",
                         "(all threads)"))
    if "eval" in found:
        e = found["eval"]
        rows += [
            (f"(d) evaluation, {e['detections']:,} detections (s)", f"{e['faster']:.1f}",
             f"{e['pycocotools']:.1f}", f"{e['pycocotools'] / e['faster']:.1f}x faster", ">= 3x"),
            ("(d) evaluation CPU time (s)", f"{e.get('faster_cpu', nan):.1f}",
             f"{e.get('pycocotools_cpu', nan):.1f}",
             f"{e.get('pycocotools_cpu', nan) / e.get('faster_cpu', nan):.1f}x faster", ""),
            (f"(d) largest difference of {e['metrics']} metrics", f"{e['max_diff']:.1e}", "", "",
             f"<= 1e-4 ({e['worst_metric']})"),
        ]
    if "anchors" in found:
        a = found["anchors"]
        rows += [
            _ratio_row(f"(e) anchors auto on {a['boxes']:,} boxes: peak RSS growth (MB)",
                       a["peak"] - a["rss_before"], a["ref_peak"] - a["ref_rss_before"], "< 200 MB",
                       digits=0),
            _ratio_row("(e) anchors auto: time (s)", a["seconds"], a["ref_seconds"],
                       "(reference: the file's second parse alone)"),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=COCO_IMAGES, help="images in the set (default COCO's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/visiondet_coco_scale"))
    parser.add_argument("--only", default="construct,workers,check,eval,anchors",
                        help="comma-separated subset of construct, workers, check, eval, anchors")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    args = parser.parse_args()
    folder = args.workdir / str(args.images)
    if args.measure:
        print(json.dumps(run_measure(args, write_dataset(folder, args.images))))
        return
    start = time.perf_counter()
    paths = write_dataset(folder, args.images)
    size_mb = paths["train"].stat().st_size / 2**20
    print(f"{folder}: train.json {size_mb:.0f} MB ({time.perf_counter() - start:.0f} s to make or find)",
          flush=True)
    found: dict[str, dict] = {}
    for part in args.only.split(","):
        if part == "construct":
            shutil.rmtree(paths["cache"], ignore_errors=True)
            found[part] = {k: in_fresh_process(args, f"construct-{k}") for k in ("pycocotools", "ours")}
            found[part]["cache_build"] = in_fresh_process(args, "construct-ours-cache")
            found[part]["cache_map"] = in_fresh_process(args, "construct-ours-cache")
        else:
            found[part] = in_fresh_process(args, part)
        print(f"{part}: {json.dumps(found[part])}", flush=True)
    print()
    print(report(args, found))


if __name__ == "__main__":
    main()
