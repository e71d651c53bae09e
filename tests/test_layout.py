"""The layout the code promises, read from the source with ``ast``: no import cycles, short functions
and files, a gateway that is only the request path, layers that import only the layers below, and
no private name used outside its module.

The layers: core/ (training, data, plugins) and plugins/ import neither registry/ nor serve/;
registry/ (durable state and its rules) never imports serve/; serve/ (processes and HTTP) may
import both. An import inside a function counts as much as one at the top of a module: it runs all
the same. Imports under ``if TYPE_CHECKING:`` never run, so they make no cycle (they still break
the layer rule: a type from a layer above is a dependency on it).
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject.toml's package-dir).
LAYERS = {
    "core": "adapterdeck.core",
    "plugins": "adapterdeck.plugins",
    "registry": "adapterdeck.registry",
    "serve": "adapterdeck.serve",
}
EXCLUDED = (Path("registry/migrations"),)  # written by alembic, one revision per file
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
MAX_GATEWAY_LINES = 350
GATEWAY = Path("serve/gateway.py")
# What each layer must never import: the layers above it.
FORBIDDEN = {
    "core": ("adapterdeck.registry", "adapterdeck.serve"),
    "plugins": ("adapterdeck.registry", "adapterdeck.serve"),
    "registry": ("adapterdeck.serve",),
}


@dataclass(frozen=True)
class Import:
    """One product module importing another, where, and whether only under ``TYPE_CHECKING``."""

    source: str
    target: str
    path: Path
    line: int
    type_checking: bool = False

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(name: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _from_module(package: str, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` names, a relative one resolved against ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join([*parts[: len(parts) - (node.level - 1)], *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class Source:
    """The product's source under ``root``: its modules, their imports, functions and lengths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._trees: dict[Path, ast.Module] = {}

    @cached_property
    def modules(self) -> dict[str, Path]:
        """Every product module by its dotted name, with its path relative to ``root``."""
        found: dict[str, Path] = {}
        for layer, package in LAYERS.items():
            for path in sorted((self.root / layer).rglob("*.py")):
                rel = path.relative_to(self.root)
                if not any(rel.is_relative_to(e) for e in EXCLUDED):
                    name = ".".join([package, *rel.with_suffix("").parts[1:]])
                    found[name.removesuffix(".__init__")] = rel
        return found

    def name_of(self, path: Path) -> str:
        return next(name for name, p in self.modules.items() if p == path)

    def in_layer(self, layer: str) -> list[Path]:
        return [p for p in self.modules.values() if p.parts[0] == layer]

    def tree(self, path: Path) -> ast.Module:
        if path not in self._trees:
            text = (self.root / path).read_text(encoding="utf-8")
            self._trees[path] = ast.parse(text, filename=str(path))
        return self._trees[path]

    def lines(self, path: Path) -> int:
        return len((self.root / path).read_text(encoding="utf-8").splitlines())

    @cached_property
    def imports(self) -> tuple[Import, ...]:
        found: list[Import] = []
        for name, path in self.modules.items():
            finder = _ImportFinder(self, name, path)
            finder.visit(self.tree(path))
            found.extend(finder.found)
        return tuple(found)

    # -- the checks -----------------------------------------------------------------------------

    def cycles(self) -> list[tuple[set[str], str]]:
        """Each import cycle: its modules, and its name (``a -> b -> a``, with each import's line)."""
        graph: dict[str, dict[str, Import]] = {name: {} for name in self.modules}
        for imp in self.imports:
            if not imp.type_checking:
                graph[imp.source].setdefault(imp.target, imp)
        named = []
        for component in components(graph):
            path = shortest_cycle(graph, component[0], set(component))
            chain = " -> ".join([path[0].source, *(imp.target for imp in path)])
            lines = ", ".join(imp.where() for imp in path)
            others = sorted(set(component) - {imp.source for imp in path})
            also = f"; also in the cycle: {', '.join(others)}" if others else ""
            named.append((set(component), f"{chain} ({lines}){also}"))
        return named

    def long_functions(self, layer: str) -> list[str]:
        return [
            f"{path}:{line} {name}: {length} lines"
            for path in self.in_layer(layer)
            for name, line, length in functions(self.tree(path))
            if length > MAX_FUNCTION_LINES
        ]

    def long_files(self, layer: str) -> list[str]:
        lengths = {path: self.lines(path) for path in self.in_layer(layer)}
        return [f"{path}: {n} lines" for path, n in sorted(lengths.items()) if n > MAX_FILE_LINES]

    def imports_from_above(self, layer: str) -> list[str]:
        above = FORBIDDEN.get(layer, ())
        return [
            f"{imp.where()}: {imp.source} imports {imp.target}"
            + (" (under TYPE_CHECKING)" if imp.type_checking else "")
            for imp in self.imports
            if imp.path.parts[0] == layer and any(_within(imp.target, p) for p in above)
        ]

    def private_names_crossing(self, layer: str) -> list[str]:
        return [hit for path in self.in_layer(layer) for hit in self._private_uses(path)]

    def _private_uses(self, path: Path) -> list[str]:
        """``from m import _x`` and ``m._x``, where ``m`` is another product module."""
        name = self.name_of(path)
        package = _package_of(name, path)
        bound: dict[str, str] = {}  # a local name -> the product module it is bound to
        found: list[str] = []
        for node in ast.walk(self.tree(path)):
            if isinstance(node, ast.ImportFrom):
                base = _from_module(package, node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in self.modules:
                        bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                    elif base in self.modules and base != name and _is_private(alias.name):
                        found.append(f"{path}:{node.lineno}: from {base} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in self.modules:
                        bound[alias.asname] = alias.name
        for node in ast.walk(self.tree(path)):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            owner = ast.unparse(node.value)
            module = bound.get(owner, owner if owner in self.modules else None)
            if module is not None and module != name:
                found.append(f"{path}:{node.lineno}: {module}.{node.attr}")
        return found


class _ImportFinder(ast.NodeVisitor):
    """The product modules one module imports: ``import``, ``from ... import`` (relative ones
    resolved), and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal."""

    def __init__(self, source: Source, name: str, path: Path) -> None:
        self.source, self.name, self.path = source, name, path
        self.package = _package_of(name, path)
        self.type_checking = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt | ast.expr) -> None:
        # `import a.b.c` runs a.b.c; `from a.b import c` runs a.b.c when that is a module, else a.b.
        while target and target not in self.source.modules:
            target = target.rpartition(".")[0]
        if target and target != self.name:
            self.found.append(Import(self.name, target, self.path, node.lineno, self.type_checking > 0))

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking += 1
        for child in node.body:
            self.visit(child)
        self.type_checking -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _from_module(self.package, node)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.source.modules else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(first.value, node)
        self.generic_visit(node)


def components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[Import]:
    """The shortest chain of imports from ``start`` back to itself, within one component."""
    came: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w, imp in sorted(graph[v].items()):
            if w not in members or w in came:
                continue
            came[w] = imp
            if w == start:
                chain = [imp]
                while chain[0].source != start:
                    chain.insert(0, came[chain[0].source])
                return chain
            queue.append(w)
    raise AssertionError(f"{start} is in a component but on no cycle")


def functions(module: ast.Module) -> list[tuple[str, int, int]]:
    """Every function and method: qualified name, ``def`` line, and length in lines.

    A function runs from its ``def`` line to its last line; decorators are not counted.
    """
    found: list[tuple[str, int, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                found.append((name, child.lineno, (child.end_lineno or child.lineno) - child.lineno + 1))
                walk(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(module, "")
    return found


SOURCE = Source(ROOT)


# -- the product --------------------------------------------------------------------------------


def test_the_product_modules_are_found() -> None:
    found = SOURCE.modules
    assert {"adapterdeck.core.train", "adapterdeck.plugins.lora", "adapterdeck.serve.gateway"} <= set(found)
    assert {"adapterdeck.core", "adapterdeck.registry", "adapterdeck.serve"} <= set(found)
    assert not [name for name in found if _within(name, "adapterdeck.registry.migrations")]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_import_cycles(layer: str) -> None:
    package = LAYERS[layer]
    through = [name for members, name in SOURCE.cycles() if any(_within(m, package) for m in members)]
    assert through == [], f"import cycles through {layer}/:\n" + "\n".join(through)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_function_over_80_lines(layer: str) -> None:
    long = SOURCE.long_functions(layer)
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines in {layer}/:\n" + "\n".join(long)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_file_over_500_lines(layer: str) -> None:
    long = SOURCE.long_files(layer)
    assert long == [], f"files over {MAX_FILE_LINES} lines in {layer}/:\n" + "\n".join(long)


def test_the_gateway_is_the_request_path_only() -> None:
    lines = SOURCE.lines(GATEWAY)
    assert lines <= MAX_GATEWAY_LINES, f"{GATEWAY} is {lines} lines (at most {MAX_GATEWAY_LINES})"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_no_layer_above_it(layer: str) -> None:
    wrong = SOURCE.imports_from_above(layer)
    assert wrong == [], f"{layer}/ must not import {' or '.join(FORBIDDEN[layer])}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_private_name_crosses_modules(layer: str) -> None:
    crossing = SOURCE.private_names_crossing(layer)
    assert crossing == [], f"private names used outside their module in {layer}/:\n" + "\n".join(crossing)


# -- the checks themselves, on a made-up tree ---------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Source:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return Source(root)


def _body(lines: int) -> str:
    """A function of exactly ``lines`` lines, def line included, behind a decorator."""
    return "@staticmethod\ndef f():\n" + "    x = 1\n" * (lines - 1)


@pytest.fixture
def made_up(tmp_path: Path) -> Source:
    return _write(
        tmp_path,
        {
            "core/__init__.py": "from adapterdeck.core.hookish import hook\n",
            "core/hookish.py": "hook = 1\n",
            # A cycle made of a top-level and a function-level import.
            "core/a.py": "from adapterdeck.core import b\n",
            "core/b.py": "def f():\n    from . import a\n",
            # A TYPE_CHECKING import makes no cycle (but its else branch runs).
            "core/c.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from adapterdeck.core import d\n"
                "else:\n    import adapterdeck.core.hookish\n"
            ),
            "core/d.py": "from adapterdeck.core import c\n",
            # A layer above, imported inside a function and by importlib.
            "core/e.py": (
                "import importlib\n"
                "def g():\n    import adapterdeck.serve.app\n"
                "    return importlib.import_module('adapterdeck.registry.r')\n"
            ),
            "core/long.py": _body(81) + "\n" + _body(80),
            "plugins/__init__.py": "",
            "registry/__init__.py": "",
            "registry/r.py": (
                "from adapterdeck.serve import app\n"
                "from adapterdeck.core.a import _secret\n"
                "from adapterdeck.core import hookish as h\n"
                "import adapterdeck.core.c\n"
                "h._hidden, adapterdeck.core.c._also, h.__name__\n"
            ),
            "registry/migrations/versions/old.py": "x = 1\n" * 600,
            "serve/__init__.py": "",
            "serve/app.py": "from adapterdeck.serve import gateway\n",
            "serve/gateway.py": "x = 1\n" * 501,
        },
    )


def test_cycles_are_found_and_named(made_up: Source) -> None:
    assert made_up.cycles() == [
        ({"adapterdeck.core.a", "adapterdeck.core.b"}, "adapterdeck.core.a -> adapterdeck.core.b -> "
         "adapterdeck.core.a (core/a.py:1, core/b.py:2)"),
    ]  # fmt: skip
    by_source = {(imp.source, imp.target): imp.type_checking for imp in made_up.imports}
    assert by_source[("adapterdeck.core.c", "adapterdeck.core.d")] is True
    assert by_source[("adapterdeck.core.c", "adapterdeck.core.hookish")] is False
    # `from package import name`: the package itself, unless the name is a module of it.
    assert ("adapterdeck.core", "adapterdeck.core.hookish") in by_source
    assert ("adapterdeck.core.a", "adapterdeck.core.b") in by_source


def test_a_longer_cycle_is_named_by_its_shortest_loop() -> None:
    here = Path("core/x.py")
    graph = {
        "a": {"b": Import("a", "b", here, 1)},
        "b": {"c": Import("b", "c", here, 2), "a": Import("b", "a", here, 3)},
        "c": {"a": Import("c", "a", here, 4)},
        "d": {"a": Import("d", "a", here, 5)},
    }
    assert components(graph) == [["a", "b", "c"]]
    assert [imp.line for imp in shortest_cycle(graph, "a", {"a", "b", "c"})] == [1, 3]


def test_long_functions_and_files_are_listed_with_their_length(made_up: Source) -> None:
    assert made_up.long_functions("core") == ["core/long.py:2 f: 81 lines"]
    assert made_up.long_files("serve") == ["serve/gateway.py: 501 lines"]
    assert made_up.long_files("registry") == []  # migrations excluded


def test_imports_from_a_layer_above_are_listed(made_up: Source) -> None:
    assert made_up.imports_from_above("core") == [
        "core/e.py:3: adapterdeck.core.e imports adapterdeck.serve.app",
        "core/e.py:4: adapterdeck.core.e imports adapterdeck.registry.r",
    ]
    assert made_up.imports_from_above("registry") == [
        "registry/r.py:1: adapterdeck.registry.r imports adapterdeck.serve.app",
    ]
    assert made_up.imports_from_above("serve") == []


def test_private_names_used_outside_their_module_are_listed(made_up: Source) -> None:
    assert sorted(made_up.private_names_crossing("registry")) == [
        "registry/r.py:2: from adapterdeck.core.a import _secret",
        "registry/r.py:5: adapterdeck.core.c._also",
        "registry/r.py:5: adapterdeck.core.hookish._hidden",
    ]
