"""The package's shape: modules short enough to read at one sitting, short functions, no import circle
(imports inside functions count: a circle dodged by a late import is still a circle)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE, MAX_FUNCTION = 400, 80


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((REPO / "lp").rglob("*.py")):
        out[".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def imports(name: str, f: Path, known: dict) -> set[str]:
    """lp modules that module `name` imports anywhere in its body."""
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {d for d in deps if d in known and d != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_modules_and_functions_are_short():
    long = []
    for name, f in modules().items():
        src = f.read_text()
        if len(src.splitlines()) > MAX_MODULE:
            long.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, f"over {MAX_MODULE} lines per module / {MAX_FUNCTION} per function: {long}"


def test_no_import_circle():
    known = modules()
    graph = {name: imports(name, f, known) for name, f in known.items()}
    assert graph["lp.run"] >= {"lp.models", "lp.pruners", "lp.distill"}  # the graph sees real imports
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # and the check finds circles
    assert cycles(graph) == []


def test_package_data_lists_files_that_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in data.items():
        for pattern in patterns:
            assert list((REPO / package).glob(pattern)), f"package-data {package}: {pattern!r} matches no file"


def test_readme_layout_matches_the_tree():
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    listed = {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip() and not line.startswith(" ")}
    entries = {f"lp/{p.name}".removesuffix(".py") + (".py" if p.suffix == ".py" else "")
               for p in (REPO / "lp").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert entries - listed == set(), "lp modules missing from the README's layout section"
    assert [x for x in listed if not (REPO / x).exists()] == [], "README layout lists paths that do not exist"
