"""The import structure: no circle among modules, no upward import, the core never imports the
experiments, and nothing in the project points outside the repository.

Every import counts, at module level or inside a function (a deferred import is still a dependency).
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alchemist", "experiments")

# what each low layer may import from the project (a prefix matches the module and its submodules)
ALLOWED = {
    "alchemist.utils": ("alchemist.utils",),
    "alchemist.config": ("alchemist.utils",),
    "alchemist.batch": (),
    "alchemist.data": ("alchemist.utils", "alchemist.config", "alchemist.batch", "alchemist.data"),
    "alchemist.models": ("alchemist.utils", "alchemist.config", "alchemist.batch", "alchemist.models"),
    "experiments.types": ("alchemist",),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from a.b import c`` is a.b.c when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_graph_sees_the_packages(graph):
    assert "alchemist.bilevel.trainer" in graph and "experiments.types" in graph
    assert "alchemist.bilevel.estimators" in graph["alchemist.bilevel.trainer"]


def test_the_core_never_imports_the_experiments(graph):
    bad = {m: sorted(t for t in ts if _under(t, "experiments")) for m, ts in graph.items() if _under(m, "alchemist")}
    assert not {m: t for m, t in bad.items() if t}


def test_no_upward_imports(graph):
    bad = {}
    for module, targets in graph.items():
        for layer, allowed in ALLOWED.items():
            if _under(module, layer):
                wrong = sorted(t for t in targets if not any(_under(t, a) for a in allowed))
                if wrong:
                    bad[module] = wrong
    assert not bad, f"imports above their layer: {bad}"


def test_no_import_circle(graph):
    """Tarjan's strongly connected components: every one must be a single module."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_private_names_cross_files(graph):
    """``from x import _name`` between project modules: a private helper used elsewhere should be public."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGES):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad


def test_nothing_points_outside_the_repository():
    """No absolute machine path and no sibling folder in code, tests, scripts, configs or docs."""
    # spelled in pieces so that this file does not match itself
    pattern = re.compile(re.escape("/" + "work/") + "|" + re.escape(".." + "/shared"))
    roots = [ROOT / d for d in ("alchemist", "experiments", "tests", "scripts", "configs", "docs")]
    files = [p for r in roots for p in r.rglob("*") if p.suffix in (".py", ".md", ".json", ".sh", ".toml", ".yaml")]
    files += [ROOT / f for f in ("README.md", "Makefile", "pyproject.toml", "train_rater.py", "infer_rater.py")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits


def test_readme_code_map_matches_the_tree():
    """Every module and script is named in README's code map, and the map names no file that is gone."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Map of the code"):readme.index("\nDocs:")]
    named = {Path(t).name for t in re.findall(r"[\w./]+\.(?:py|sh|json)\b", section)}
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"]
    files += [p for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh")]
    files += [ROOT / f for f in ("train_rater.py", "infer_rater.py")]
    assert not sorted(str(p.relative_to(ROOT)) for p in files if p.name not in named)
    existing = {p.name for d in (*PACKAGES, "scripts", "configs", "tests") for p in (ROOT / d).rglob("*")}
    existing |= {p.name for p in ROOT.iterdir()}
    assert not sorted(n for n in named if n not in existing)
