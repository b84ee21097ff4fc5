"""Layering of the first-party packages, read from the source with ``ast`` (nothing is imported).

Rules (docs/ARCHITECTURE.md: dependencies point one way, ``apps -> detection -> vision``):
- no import cycle between first-party modules, hidden ones included: imports inside ``TYPE_CHECKING`` blocks
  and functions count, and so do the modules a registry names in a string for ``importlib``
  (``"apps.tasks.detection:DetectionTask"``), since the registry's module loads them;
- ``vision`` imports neither ``detection`` nor ``apps``, and ``detection`` does not import ``apps``, at any
  level (function bodies and ``TYPE_CHECKING`` blocks included);
- no function-local first-party import, except in the ``run`` function of a command module
  (apps/commands/*.py), where it keeps ``visiondet --help`` from importing torch.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vision", "detection", "apps")
LAYER = {"vision": 0, "detection": 1, "apps": 2}  # a module may import its own layer and those below


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported first-party module, dotted
    path: str  # importing file, relative to the repository root
    line: int
    function: str | None  # enclosing function (dotted for nested ones), None at module level
    type_checking: bool  # inside ``if TYPE_CHECKING:``
    registry: bool = False  # a module named in a string (``"pkg.mod"`` or ``"pkg.mod:Name"``), for importlib


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


# a string naming a first-party module, alone or with an attribute: what a registry hands to importlib
_NAMED_MODULE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?::[A-Za-z_]\w*)?$")


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, known: set[str]) -> list[str]:
    """The first-party modules an import statement loads (``from a import b`` loads ``a.b`` when that is a
    module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = source.split(".") if is_package else source.split(".")[:-1]
            base = package[: len(package) - node.level + 1]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
    out = []
    for name in names:
        if name.split(".")[0] not in PACKAGES:
            continue
        # `import a.b.c` of a module that is not in the tree: keep the longest known prefix
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name not in out:
            out.append(name)
    return out


def file_imports(path: Path, root: Path, known: set[str]) -> list[Import]:
    """Every first-party import of one file, with where it sits (function, ``TYPE_CHECKING``)."""
    rel, source = str(path.relative_to(root)), module_name(path, root)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                name = getattr(child, "name", "<lambda>")
                visit(child, f"{function}.{name}" if function else name, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), function, type_checking)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(child, source, is_package, known):
                    found.append(Import(source, target, rel, child.lineno, function, type_checking))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                match = _NAMED_MODULE.match(child.value)
                if match and match.group(1) in known:
                    found.append(Import(source, match.group(1), rel, child.lineno, function, type_checking,
                                        registry=True))
            else:
                visit(child, function, type_checking)

    visit(ast.parse(path.read_text(), filename=str(path)), None, False)
    return found


def collect_imports(root: Path = ROOT) -> list[Import]:
    files = first_party_files(root)
    known = {module_name(p, root) for p in files}
    return [imp for path in files for imp in file_imports(path, root, known)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return cycles


def module_graph(imports: list[Import], *, hidden: bool = True) -> dict[str, set[str]]:
    """Module -> the modules it imports. ``hidden=False`` keeps only what runs when the module is imported
    (module level, outside ``TYPE_CHECKING``, no registry strings): the rule before, which let a circle
    through a registry or a ``TYPE_CHECKING`` import pass."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        seen = imp.function is None and not imp.type_checking and not imp.registry
        if (hidden or seen) and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def layer_violations(imports: list[Import]) -> list[str]:
    return [f"{imp.path}:{imp.line}: {imp.source} {'names' if imp.registry else 'imports'} {imp.target}"
            for imp in imports if LAYER[imp.target.split(".")[0]] > LAYER[imp.source.split(".")[0]]]


def local_imports(imports: list[Import]) -> dict[str, list[str]]:
    """``"path:function" -> ["path:line: target", ...]`` for function-local imports outside the commands'
    ``run``."""
    out: dict[str, list[str]] = {}
    for imp in imports:
        if imp.function is None or imp.registry:
            continue
        if imp.path.startswith("apps/commands/") and imp.function.split(".")[0] == "run":
            continue
        out.setdefault(f"{imp.path}:{imp.function}", []).append(f"{imp.path}:{imp.line}: {imp.target}")
    return out


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports()


def test_no_import_cycles(imports):
    cycles = find_cycles(module_graph(imports))
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_dependencies_point_one_way(imports):
    bad = layer_violations(imports)
    assert not bad, "imports against apps -> detection -> vision:\n" + "\n".join(bad)


def test_no_function_local_first_party_imports(imports):
    found = local_imports(imports)
    assert not found, ("function-local first-party imports (move them to the module top):\n"
                       + "\n".join(line for lines in found.values() for line in lines))


# ----------------------------------------------------------------------------------------------------------
# The checks themselves, on a small tree written here: each rule must catch what it is for.


def _tree(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return collect_imports(tmp_path)


def test_checks_catch_a_cycle_a_wrong_way_import_and_a_local_import(tmp_path):
    imports = _tree(tmp_path, {
        "vision/a.py": "from vision.b import x\nimport torch\n",
        "vision/b.py": "from . import a\n",  # relative: vision.a
        "vision/c.py": "def f():\n    from detection import d\n",
        "detection/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from apps.e import E\n",
        "apps/e.py": "import vision.a\n",
        "apps/commands/go.py": "def run(args):\n    from apps import e\n\ndef helper():\n    import apps.e\n",
    })
    assert find_cycles(module_graph(imports)) == [["vision.a", "vision.b"]]
    assert sorted(v.split(": ", 1)[1] for v in layer_violations(imports)) == [
        "detection.d imports apps.e", "vision.c imports detection.d"]
    assert sorted(local_imports(imports)) == ["apps/commands/go.py:helper", "vision/c.py:f"]


def test_type_checking_function_and_registry_imports_count_in_cycles(tmp_path):
    imports = _tree(tmp_path, {
        "apps/x.py": "import apps.y\n",
        "apps/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import apps.x\n",
        "apps/f.py": "import apps.g\n",
        "apps/g.py": "def f():\n    import apps.f\n",
        "apps/reg.py": "import importlib\nKINDS = {'a': 'apps.impl:Impl'}\n"
                       "def get(name):\n    return importlib.import_module(KINDS[name].split(':')[0])\n",
        "apps/impl.py": "from apps.reg import KINDS\n",
        "apps/text.py": '"""apps.x is named in prose, not as a module string"""\nWHERE = "apps.x is here"\n',
    })
    assert find_cycles(module_graph(imports)) == [["apps.f", "apps.g"], ["apps.impl", "apps.reg"],
                                                  ["apps.x", "apps.y"]]
    assert find_cycles(module_graph(imports, hidden=False)) == []  # what the rule before saw
    assert not [imp for imp in imports if imp.source == "apps.text"]


def _copy_of_the_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return tmp_path


def _cycles_with(root: Path, path: str, addition: str, *, hidden: bool = True) -> list[list[str]]:
    """The cycles of the tree at ``root`` with ``addition`` appended to its file ``path`` (then undone)."""
    file = root / path
    before = file.read_text()
    file.write_text(before + addition)
    try:
        return find_cycles(module_graph(collect_imports(root), hidden=hidden))
    finally:
        file.write_text(before)


def test_the_config_tasks_circle_fails_even_hidden_behind_the_registry_or_type_checking(tmp_path):
    # the circle issue 27 item 4 untied, put back into a copy of this tree in the two ways it hid: the
    # config loader reads the task registry, and a task module imports the loader's types again
    root = _copy_of_the_tree(tmp_path)
    assert find_cycles(module_graph(collect_imports(root))) == []
    behind_type_checking = ("\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    from apps.config import Experiment as _Experiment\n")
    cycles = _cycles_with(root, "apps/tasks/base.py", behind_type_checking)
    assert any({"apps.config", "apps.tasks", "apps.tasks.base"} <= set(c) for c in cycles), cycles
    assert _cycles_with(root, "apps/tasks/base.py", behind_type_checking, hidden=False) == []

    # a task module is reached only through the registry's string, so importing the loader from it at
    # module level made a circle that no import statement showed
    behind_the_registry = "\nfrom apps.config import ConfigError as _ConfigError\n"
    cycles = _cycles_with(root, "apps/tasks/classification.py", behind_the_registry)
    assert any({"apps.config", "apps.tasks", "apps.tasks.classification"} <= set(c) for c in cycles), cycles
    assert _cycles_with(root, "apps/tasks/classification.py", behind_the_registry, hidden=False) == []
