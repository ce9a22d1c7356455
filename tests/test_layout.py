"""The package's shape (docs/design.md, "Packages and the direction of imports"), read from the
source with ``ast`` (nothing is imported): no import cycle between modules, no module over
400 lines, and every import going down the layers below, never up (annotations included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tive"
MAX_LINES = 400

# bottom to top; a layer imports only the layers before it (and its own modules)
LAYERS = ["tive", "errors", "settings", "util", "data", "models", "projection", "store", "output",
          "selection", "warmup", "scoring", "health", "api", "cli", "__main__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tive_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every tive import in the file: function-local ones and those
    under ``if TYPE_CHECKING:`` included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tive":
            for alias in node.names:  # from tive.models import registry: the module itself
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tive"]
    return found


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}
GRAPH = {name: {m for _, m in tive_imports(p) if m in MODULES and m != name}
         for name, p in MODULES.items()}


def layer(module: str) -> str:
    return module.split(".")[1] if module != "tive" else "tive"


def test_the_modules_are_found():
    assert len(MODULES) > 40 and "tive.scoring.run" in MODULES and "tive.cli.commands" in MODULES
    assert {layer(m) for m in MODULES} == set(LAYERS)


def test_no_module_is_longer_than_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_few_modules_stand_at_the_top_and_the_packages_import_nothing_when_named():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "api.py", "errors.py", "settings.py"]
    inits = sorted(ROOT.glob("*/__init__.py"))
    assert len(inits) == len(LAYERS) - 5  # every layer but tive, errors, settings, api, __main__
    for path in inits:  # a docstring saying what the package owns, and nothing else
        body = ast.parse(path.read_text()).body
        assert len(body) == 1 and isinstance(body[0].value, ast.Constant), path


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_imports_go_down_the_layers():
    up = []
    for module, path in MODULES.items():
        here = layer(module)
        if here == "tive":
            continue  # tive/__init__.py names its exports as strings, imported on first use
        for line, dep in tive_imports(path):
            there = layer(dep)
            if there != here and LAYERS.index(there) > LAYERS.index(here):
                up.append(f"{path.relative_to(ROOT.parent)}:{line}: {here} imports {dep}")
    assert up == []


def test_every_section_a_docstring_points_to_exists():
    design = (ROOT.parent / "docs" / "design.md").read_text()
    headings = {line[3:].strip() for line in design.splitlines() if line.startswith("## ")}
    pointed = {}
    for path in FILES:
        text = " ".join(path.read_text().split())  # a reference may be broken over lines
        for match in re.finditer(r'docs/design\.md,?\s*((?:"[^"]+"(?:\s*and\s*)?)+)', text):
            for section in re.findall(r'"([^"]+)"', match.group(1)):
                pointed.setdefault(section, []).append(path.name)
    assert len(pointed) >= 8  # the references were found
    assert {s: where for s, where in pointed.items() if s not in headings} == {}
