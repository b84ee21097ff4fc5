"""One notion of an R-CNN generation (detection/generation.py): each built detector carries the Generation its
arch names, its capabilities say what its parts are, and no other module tells generations apart by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from detection.export import DetectorGraph
from detection.generation import FAST_RCNN, FASTER_RCNN, GENERATIONS, RCNN, generation_of
from detection.models import DETECTOR_ARCHS, split_arch
from detection.rpn import RegionProposalNetwork
from vision.export import ExportError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("vision", "detection", "apps")
THE_ONE_PLACE = "detection/generation.py"
PREFIXES = r"(?:faster|fast|rcnn)"  # an arch prefix test, whole or in part
NAMES = r"(?:faster_rcnn|fast_rcnn|rcnn)"  # ("fast" and "faster" also name a selective-search mode and an
# evaluation backend)
# The former task "rcnn" is a checkpoint layout that loading upgrades, not a generation.
ALLOWED = ('ckpt.get("task") != "rcnn"',)
# Ways the tree used to tell generations apart, each a second answer to "which generation is this?"
FORBIDDEN = {
    "split_arch(...)[0] compared": re.compile(r"split_arch\(.*\)\[0\]\s*(?:==|!=|\bin\b|\bnot\b)"),
    "arch prefix test": re.compile(rf"""\.startswith\(\s*f?["']{PREFIXES}"""),
    "detector_kind": re.compile(r"\bdetector_kind\b"),
    "features_per_region flag": re.compile(
        r"""features_per_region\s*=(?!=)|getattr\([^)]*["']features_per_region"""),
    "generation name compared": re.compile(
        rf"""(?:==|!=)\s*["']{NAMES}["']|["']{NAMES}["']\s*(?:==|!=)|\bin\s*[(\[{{]\s*["']{NAMES}["']"""),
    "generation name returned": re.compile(rf"""\breturn\s+["']{NAMES}["']"""),
}


def offences(root: Path) -> list[str]:
    """``path:line: what`` for every line of ``root``'s scanned packages that names a generation outside
    detection/generation.py."""
    found = []
    for package in SCANNED:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative == THE_ONE_PLACE:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if any(allowed in line for allowed in ALLOWED):
                    continue
                for what, pattern in FORBIDDEN.items():
                    if pattern.search(line):
                        found.append(f"{relative}:{number}: {what}: {line.strip()}")
                        break
    return found


def test_no_generation_is_told_apart_by_name_outside_its_one_place():
    assert offences(ROOT) == []


@pytest.mark.parametrize("line", [
    'if split_arch(cfg.arch)[0] == "rcnn":',
    'return split_arch(arch)[0] in ("fast", "rcnn")',
    'if not exp.model.arch.startswith("faster_rcnn_"):',
    "generation = 2 if arch.startswith('rcnn_') else 0",
    "kind = detector_kind(model)",
    "    features_per_region = True",
    'if getattr(heads, "features_per_region", False):',
    'if e.kind == "faster_rcnn":',
    "return 'fast_rcnn'",
])
def test_the_scan_catches_each_old_way(tmp_path, line):
    for package in SCANNED:
        (tmp_path / package).mkdir()
    (tmp_path / "detection" / "generation.py").write_text(f"{line}\n")  # the one place may
    assert offences(tmp_path) == []
    (tmp_path / "apps" / "somewhere.py").write_text(f"x = 1\n{line}\n")
    assert [o.split(":")[:2] for o in offences(tmp_path)] == [["apps/somewhere.py", "2"]]


def test_every_arch_names_its_generation():
    assert GENERATIONS == (FASTER_RCNN, FAST_RCNN, RCNN)
    for arch in DETECTOR_ARCHS:
        generation, body = split_arch(arch)
        assert generation is generation_of(arch) and arch == f"{generation.prefix}_{body}"
    assert sum(split_arch(a)[0] is RCNN for a in DETECTOR_ARCHS) == 5  # vgg16, r18 ... r101
    with pytest.raises(ValueError, match="unknown detector arch 'yolo_v3'"):
        generation_of("yolo_v3")
    with pytest.raises(ValueError, match="unknown detector arch 'fast_rcnn_r19'"):
        split_arch("fast_rcnn_r19")


@pytest.mark.parametrize("arch", ["faster_rcnn_r18_fpn", "fast_rcnn_r18_c4", "rcnn_r18"])
def test_a_built_detector_carries_its_generation_and_its_parts_match_it(arch, tiny_detector):
    model = tiny_detector(arch, rcnn={"input_size": 32} if generation_of(arch).features_per_region else None)
    generation = model.generation
    assert generation is generation_of(arch)
    assert isinstance(model.proposal_generator, RegionProposalNetwork) == generation.learned_proposals
    # R-CNN computes nothing over the whole image
    assert (list(model.backbone.parameters()) == []) == generation.features_per_region
    assert hasattr(model.roi_heads, "train_later_stages") == generation.later_stages
    assert not hasattr(model, "train_later_stages")  # the skeleton has no stages of its own
    if generation.exportable:
        DetectorGraph(model)
    else:
        with pytest.raises(ExportError, match="R-CNN is not exported"):
            DetectorGraph(model)
