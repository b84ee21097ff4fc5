"""docs/ARCHITECTURE.md's module map is the reader's index: every module is in it, and nothing else is."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vision", "detection", "apps")


def mapped_paths(text: str) -> set[str]:
    """The paths the module map's tree names: folders end in '/', modules in '.py', each level indented two
    spaces; any other line continues the description above it."""
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    paths, parents = set(), []  # parents: (indent, folder path)
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match or not match.group(2).endswith(("/", ".py")):
            continue
        indent, name = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + name
        if name.endswith("/"):
            parents.append((indent, path))
        else:
            paths.add(path)
    return paths


def source_modules() -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }


def test_every_module_is_in_the_module_map():
    mapped = mapped_paths((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    missing = sorted(source_modules() - mapped)
    assert not missing, f"modules missing from docs/ARCHITECTURE.md's module map: {missing}"


def test_the_module_map_names_no_missing_module():
    mapped = mapped_paths((ROOT / "docs" / "ARCHITECTURE.md").read_text())
    stale = sorted(p for p in mapped if not (ROOT / p).is_file())
    assert not stale, f"docs/ARCHITECTURE.md lists modules that do not exist: {stale}"


def test_the_tree_parser_reads_nesting():
    text = ("## Module map\n```\nvision/\n  a.py  x\n  data/\n    b.py  y\n            more about b\n  c.py\n"
            "apps/\n  d.py\n```\n")
    assert mapped_paths(text) == {"vision/a.py", "vision/data/b.py", "vision/c.py", "apps/d.py"}
