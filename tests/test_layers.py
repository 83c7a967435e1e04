"""The import graph: arrows run one way and nothing imports in a circle.

CLI / demo → engine → adapters → reference models, with ``flowaudit.utils`` at the bottom
(anything may import it; it imports nothing of ours). Inside the engine the subpackages
follow the pipeline (:data:`ENGINE_ORDER`): a subpackage imports only those before it. The graph is read from the
source with :mod:`ast` (every ``import``, also those inside functions), file
names resolved to their installed module names (``adapters/x.py`` is
``flowaudit.adapters.x``). The checker itself is tested on small fake trees
that break each rule once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject's package-dir)
PACKAGES = {
    "flowaudit": "flowaudit",
    "adapters": "flowaudit.adapters",
    "reference_models": "flowaudit.reference_models",
}
TOP = ("flowaudit.cli", "flowaudit.demo", "flowaudit.__main__")
BOTTOM = "flowaudit.utils"
# the engine's subpackages in pipeline order; the engine's top modules (audit, report, errors) sit outside it
ENGINE_ORDER = ("config", "io", "tracing", "stats", "runs", "evidence", "render")


def module_names(root: Path) -> dict[str, Path]:
    """Installed module name → file, for every ``.py`` of the three packages under ``root``."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that module ``name`` (file ``path``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # ``from pkg import sub`` imports the sub-module when there is one
            targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in known else base_name for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in ("adapters", "reference_models"):
                found.add(t)  # a non-installed name: always wrong, reported by check()
            elif t in known:
                found.add(t)
    found.discard(name)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer(name: str) -> int:
    """-1 the bottom utilities, 0 reference models, 1 adapters, 2 the engine, 3 the CLI and demo."""
    if _within(name, BOTTOM):
        return -1
    if any(_within(name, top) for top in TOP):
        return 3
    if name.startswith("flowaudit.reference_models"):
        return 0
    if name.startswith("flowaudit.adapters"):
        return 1
    return 2


def _stage(name: str) -> int:
    """Position of an engine module's subpackage in :data:`ENGINE_ORDER`; -1 outside them."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "flowaudit" and parts[1] in ENGINE_ORDER:
        return ENGINE_ORDER.index(parts[1])
    return -1


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_of(root: Path) -> dict[str, set[str]]:
    mods = module_names(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def check(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each."""
    problems = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if b.split(".")[0] in ("adapters", "reference_models"):
                problems.append(f"{a} imports {b}: use the installed name flowaudit.{b}")
            elif layer(a) == -1 and layer(b) != -1:
                problems.append(f"{a} imports {b}: the bottom layer imports nothing of ours")
            elif layer(b) > layer(a):
                problems.append(f"{a} imports {b}: an upward arrow")
            elif layer(a) == 2 and layer(b) == 0:
                problems.append(f"{a} imports {b}: the engine reaches models only through adapters")
            elif _stage(b) > _stage(a) >= 0:
                problems.append(f"{a} imports {b}: against the engine's pipeline order")
    problems += [f"import cycle: {' → '.join(c)}" for c in cycles(graph)]
    packages = {}
    for a, targets in graph.items():
        for b in targets:
            pa, pb = layer(a) if layer(a) < 3 else 2, layer(b) if layer(b) < 3 else 2
            if pa != pb:
                packages.setdefault(pa, set()).add(pb)
    problems += [f"package cycle: {c}" for c in cycles({str(k): {str(v) for v in vs} for k, vs in packages.items()})]
    return problems


def test_the_project_keeps_its_layers() -> None:
    graph = graph_of(ROOT)
    assert len(graph) > 40 and graph["flowaudit.audit"] and graph["flowaudit.adapters.reference"]
    assert check(graph) == []


def test_imports_are_resolved_to_installed_names() -> None:
    graph = graph_of(ROOT)
    assert "flowaudit.adapters.hooks" in graph["flowaudit.adapters.reference"]  # from .hooks import …
    assert "flowaudit.utils.atomic" in graph["flowaudit.reference_models.training"]
    assert "flowaudit.adapters" in graph["flowaudit.audit"]  # from .adapters import adapt
    assert "flowaudit.audit" in graph["flowaudit.cli.main"]  # a lazy import inside a command counts


def _fake(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return graph_of(tmp_path)


@pytest.mark.parametrize(
    "files, expect",
    [
        ({"reference_models/train.py": "from flowaudit.report import x\n", "flowaudit/report.py": ""}, "upward arrow"),
        ({"adapters/ref.py": "def f():\n    from flowaudit import hooks\n", "flowaudit/hooks.py": ""}, "upward arrow"),
        (
            {"flowaudit/render.py": "from .report import fmt\n", "flowaudit/report.py": "from .render import html\n"},
            "import cycle",
        ),
        (
            {"flowaudit/audit.py": "from .reference_models.toy import Toy\n", "reference_models/toy.py": ""},
            "only through adapters",
        ),
        ({"flowaudit/data.py": "from reference_models.data import read\n"}, "installed name"),
        ({"flowaudit/utils/lock.py": "from ..errors import E\n", "flowaudit/errors.py": ""}, "bottom layer"),
        (
            {"flowaudit/io/read.py": "from ..render.html import page\n", "flowaudit/render/html.py": ""},
            "pipeline order",
        ),
    ],
)
def test_the_checker_catches_each_broken_rule(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    problems = check(_fake(tmp_path, files))
    assert any(expect in p for p in problems), problems


def test_the_checker_passes_a_clean_fake_tree(tmp_path: Path) -> None:
    files = {
        "flowaudit/cli.py": "from .audit import scan\n",
        "flowaudit/audit.py": "from .adapters import adapt\nfrom .utils.atomic import atomic_path\n",
        "flowaudit/utils/atomic.py": "",
        "flowaudit/render/html.py": "from ..io.read import load\n",
        "flowaudit/io/read.py": "",
        "adapters/ref.py": "from flowaudit.reference_models import Flow\n",
        "reference_models/train.py": "from ..utils.atomic import atomic_path\n",
    }
    assert check(_fake(tmp_path, files)) == []
