"""The package's shape, read from its source: one way in, no cycles, no reaching into privates.

An AST walk of every module (imports inside functions included: a lazy import still ties two
modules together) checks that no module imports another module's private name (``from m import
_x`` or ``m._x``), that no two modules import each other (directly or round a longer loop), that
``--threads`` is declared once (``cli_options.add_threads_option``), and that no module grows
past ``MAX_LINES``. Known offenders in modules other work is rewriting are listed below with a
reason; an entry that no longer applies fails too, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import langchain_parallel_reason

PACKAGE = "langchain_parallel_reason"
ROOT = Path(langchain_parallel_reason.__file__).parent
MAX_LINES = 700

# (importer, owner, name) -> why it is still there.
ALLOWED_PRIVATE_IMPORTS: dict[tuple[str, str, str], str] = {}
# Sorted module lists of allowed cycles -> why.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}
# module -> why it may exceed MAX_LINES for now.
ALLOWED_LONG_MODULES: dict[str, str] = {}
# The faces (the CLI and the benchmarks) go through the door: the chat model, and the runtime's
# public modules (its package, base, door, events, threads); never decoding or pipeline, nor an
# engine class directly. The benchmarks that time the decoder's own kernels are the exceptions.
FACES = ("cli", "cli_ask", "cli_options", "bench")
RUNTIME_PUBLIC = ("runtime", "runtime.base", "runtime.door", "runtime.events", "runtime.threads")
_KERNELS = "times the decoder's own functions (a kernel benchmark, below the runtime)"
ALLOWED_FACE_IMPORTS: dict[tuple[str, str], str] = {
    ("bench.decode", "decoding"): _KERNELS,
    ("bench.decode", "decoding.cache"): _KERNELS,
    ("bench.decode", "decoding.decoder"): _KERNELS,
    ("bench.decode", "decoding.masks"): _KERNELS,
    ("bench.decode", "decoding.sequential"): _KERNELS,
    ("bench.profile", "decoding.cache"): _KERNELS,
    ("bench.profile", "decoding.decoder"): _KERNELS,
    ("bench.profile", "decoding.sequential"): _KERNELS,
    ("bench.costs", "decoding.cache"): _KERNELS,
    ("bench.costs", "decoding.sequential"): _KERNELS,
    ("bench.serve", "decoding.cache"): "prices a plain forward for its cost model (a kernel)",
    ("bench.serve", "decoding.sequential"): "prices a plain forward for its cost model",
    (
        "bench.questions",
        "decoding.repetition",
    ): "counts loops left in answers with the guard's rule",
    ("bench.questions", "pipeline"): "--route-only asks the router alone (choose_route)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)  # "" is the package itself


def package_sources() -> dict[str, str]:
    """Every module of the package, by name relative to the package (``bench.decode``)."""
    return {_module_name(p): p.read_text(encoding="utf-8") for p in sorted(ROOT.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The package-relative module an ``ImportFrom`` names, or None when it is outside."""
    if node.level == 0:
        name = node.module or ""
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        return name.removeprefix(PACKAGE).lstrip(".")
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]  # each extra dot climbs one package
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(
    sources: dict[str, str], packages: set[str]
) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Module -> modules it imports, and every ``(importer, owner, private name)`` reach-in.

    ``packages`` names the modules that are packages (``__init__``), for relative imports.
    """
    edges: dict[str, set[str]] = {m: set() for m in sources}
    private: list[tuple[str, str, str]] = []
    for module, text in sources.items():
        tree = ast.parse(text)
        aliases: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                owner = _absolute(module, module in packages, node)
                if owner is None:
                    continue
                for alias in node.names:
                    sub = f"{owner}.{alias.name}".lstrip(".")
                    if sub in sources:  # `from pkg import module`
                        edges[module].add(sub)
                        aliases[alias.asname or alias.name] = sub
                        continue
                    edges[module].add(owner)
                    if alias.name.startswith("_") and owner != module:
                        private.append((module, owner, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE + "."):
                        target = alias.name.removeprefix(PACKAGE + ".")
                        edges[module].add(target)
                        if alias.asname:
                            aliases[alias.asname] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != module
            ):
                private.append((module, aliases[node.value.id], node.attr))
        edges[module].discard(module)
    return edges, private


def import_cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected groups of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(tuple(sorted(group)))

    for v in edges:
        if v not in index:
            visit(v)
    return cycles


def _packages() -> set[str]:
    return {_module_name(p) for p in ROOT.rglob("__init__.py")}


def _check_against(found: set, allowed: dict, what: str, fix: str) -> None:
    """Fail on a finding not in ``allowed``, and on an allowed one no longer found."""
    new = sorted(found - set(allowed))
    assert not new, f"{what}: {new}; {fix}"
    stale = sorted(set(allowed) - found)
    assert not stale, f"fixed, remove from the allow-list of {what}: {stale}"


def test_no_module_imports_another_modules_private_name() -> None:
    _, private = import_graph(package_sources(), _packages())
    _check_against(
        set(private),
        ALLOWED_PRIVATE_IMPORTS,
        "private names imported across modules",
        "give the name a public alias in its module (and __all__), or move the helper where "
        "both can import it",
    )


def test_no_import_cycle() -> None:
    edges, _ = import_graph(package_sources(), _packages())
    _check_against(
        set(import_cycles(edges)),
        ALLOWED_CYCLES,
        "import cycles",
        "move what both modules need into a third module (e.g. shared CLI options into "
        "cli_options.py)",
    )


def test_the_faces_import_no_cycle_and_no_private_name() -> None:
    # The CLI and benchmark modules get no allowance for cycles (only the listed reach-ins).
    faces = {m for m in package_sources() if m.startswith(("cli", "bench"))}
    edges, _ = import_graph(package_sources(), _packages())
    assert not [c for c in import_cycles(edges) if set(c) & faces]
    assert {"cli", "cli_ask", "cli_options", "bench.decode"} <= faces


def _is_face(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FACES)


def _behind_the_door(target: str) -> bool:
    """A module the faces may not import: decoding, pipeline, or a runtime module that is not
    one of its public ones (an engine class, the transport, the scheduler's parts)."""
    if target.split(".")[0] in ("decoding", "pipeline"):
        return True
    return target.startswith("runtime") and target not in RUNTIME_PUBLIC


def test_the_faces_go_through_the_door() -> None:
    edges, _ = import_graph(package_sources(), _packages())
    found = {
        (module, target)
        for module, targets in edges.items()
        if _is_face(module)
        for target in targets
        if _behind_the_door(target)
    }
    _check_against(
        found,
        ALLOWED_FACE_IMPORTS,
        "faces importing past the door",
        "use the chat model or runtime.open_engine / runtime.events instead",
    )


def test_the_checks_catch_a_reach_in_and_a_cycle() -> None:
    # A synthetic package: a imports b's private name and b imports a (lazily): both are seen.
    sources = {
        "": "",
        "a": "from langchain_parallel_reason.b import _helper\n",
        "b": "def f():\n    from . import a\n    return a._secret\n",
        "c": "from .a import public\n",
    }
    edges, private = import_graph(sources, {""})
    assert sorted(private) == [("a", "b", "_helper"), ("b", "a", "_secret")]
    assert import_cycles(edges) == [("a", "b")]


def test_threads_option_is_declared_once() -> None:
    declared = []
    for module, text in package_sources().items():
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value == "--threads"
            ):
                declared.append(module)
    assert declared == ["cli_options"], "declare --threads with cli_options.add_threads_option"


@pytest.mark.parametrize("module", sorted(package_sources()))
def test_module_is_short(module: str) -> None:
    lines = package_sources()[module].count("\n")
    if module in ALLOWED_LONG_MODULES:
        assert lines > MAX_LINES, f"{module} is {lines} lines now: remove it from the allow-list"
        return
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concern (<= {MAX_LINES})"
