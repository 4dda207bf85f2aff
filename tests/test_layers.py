"""The package's structure, checked: layers without cycles, file sizes, docs the code cites.

docs/architecture.md §1 draws the layers; this test holds the code to the drawing. Every import
counts — at module level, inside functions (lazy) and under ``TYPE_CHECKING`` — because each one
is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "dmdr_fast"

#: Top-level units of ``dmdr_fast`` from the bottom up; a unit may import only units of lower
#: layers (its own included). The package's ``__init__`` is the public facade above them all.
LAYERS: list[set[str]] = [
    {"_io", "_errors", "_dtypes", "_native", "_device", "kernels"},
    {"conditions"},
    {"backends"},
    {"ops"},
    {"algo", "models", "data", "eval", "rewards"},
    {"config", "configs"},
    {"train", "plan"},
    {"pipelines"},
    {"recipes", "benchmarks"},
    {"cli"},
]
_LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
#: Same-layer imports that are allowed, and why (none may form a cycle; the cycle check runs too).
SAME_LAYER = {
    ("config", "configs"): "the preset loader builds the config it loads",
    ("configs", "config"): "the preset loader builds the config it loads",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[tuple[str, int]]:
    """(imported dmdr_fast module, line) for every import statement of one module."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                out.add((t, node.lineno))
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<facade>"


def _graph() -> dict[str, set[tuple[str, int]]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {"<facade>"}
    assert units <= set(_LAYER_OF), f"add to LAYERS (and docs/architecture.md §1): {units - set(_LAYER_OF)}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for mod, targets in _graph().items():
        src = _unit(mod)
        if src == "<facade>":
            continue
        for target, line in targets:
            dst = _unit(target)
            if dst in ("<facade>", src):
                continue
            if _LAYER_OF[dst] > _LAYER_OF[src] or (
                _LAYER_OF[dst] == _LAYER_OF[src] and (src, dst) not in SAME_LAYER
            ):
                bad.append(f"{mod}:{line} imports {target} ({src} -> {dst})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_units_or_modules():
    graph = _graph()
    units: dict[str, set[str]] = defaultdict(set)
    for mod, targets in graph.items():
        for target, _ in targets:
            if _unit(mod) != "<facade>" and _unit(target) not in ("<facade>", _unit(mod)):
                units[_unit(mod)].add(_unit(target))
    assert not _cycles(units), f"package-level import cycles: {_cycles(units)}"
    # Module level, ignoring a package __init__ that re-exports its own submodules (the usual
    # facade; the submodules must not import it back, which the cycle check then catches).
    modules = {
        m: {t for t, _ in ts if not (m.endswith("__init__") or t.startswith(m + "."))}
        for m, ts in graph.items()
    }
    assert not _cycles(modules), f"module-level import cycles: {_cycles(modules)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_size_budget(path: Path):
    """A file over 800 lines is a review flag (docs/architecture.md §2): split it."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 800, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_the_code_cites_only_documents_of_this_repository():
    root = PACKAGE.parents[1]
    pattern = re.compile(r"DESIGN\.md|DESIGN §|PAPER_NOTES")
    places = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.yaml"), *(root / "kernels").rglob("*")]
    places += [*(root / "csrc").rglob("*")]
    places += [*(root / "tests").rglob("*.py"), *(root / "scripts").rglob("*"), root / "CMakeLists.txt"]
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in places
        if p.is_file() and p != Path(__file__)
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "cite docs/method.md or docs/architecture.md instead:\n" + "\n".join(hits)
    for doc in ("method.md", "architecture.md"):
        assert (root / "docs" / doc).is_file()


def _trainer_source() -> ast.Module:
    return ast.parse((PACKAGE / "train" / "trainer.py").read_text(encoding="utf-8"))


def test_trainer_step_fits_one_screen():
    trainer = next(n for n in _trainer_source().body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    step = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "step")
    lines = step.end_lineno - step.lineno + 1 + len(step.decorator_list)
    assert lines <= 60, f"Trainer.step is {lines} lines"


def test_no_private_trainer_member_is_used_outside_the_trainer():
    """The Trainer's private helpers are its own; other code uses its public API or algo/."""
    trainer = next(n for n in _trainer_source().body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    private = {
        n.name for n in ast.walk(trainer) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    } | {
        t.attr
        for n in ast.walk(trainer)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    private = {name for name in private if name.startswith("_") and not name.startswith("__")}
    root = PACKAGE.parents[1]
    uses = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py")]:
        if path == PACKAGE / "train" / "trainer.py" or path == Path(__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                uses.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Constant) and node.value in private:  # monkeypatch.setattr(tr, "_x")
                uses.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not uses, "private Trainer members used elsewhere:\n" + "\n".join(uses)
