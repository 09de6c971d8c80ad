"""The import rules of docs/layout.md, checked on the source: python/aquakv's imports are parsed (never executed)
and the test fails on a cycle, an upward import, a private name imported from another module, and a transformers
import reaching the engine-independent codec layer.

Every import counts, module-level or inside a function (a cycle hidden in a function body is still a cycle in the
design); imports under `if TYPE_CHECKING:` do not (they never run). A violation that must stay for a while is listed
in ALLOWED with the reason (none today); the entry goes when the code is fixed, and a stale entry fails too.
"""
from __future__ import annotations

import ast
import fnmatch
import pathlib
from collections import defaultdict

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "aquakv"

# Layers, bottom up: a unit imports only units of a lower layer (and itself). Same-layer units never import each
# other (so kv and weights stay apart). `aquakv` is the package's own __init__: the public face, at the top.
LAYERS = [
    {"_C"},
    {"atomic_writes", "progress", "version", "lazy", "hf_compat", "data", "models", "runner", "grids", "reference",
     "ops_checks", "allocation"},
    {"ops"},
    {"quantizer", "uniform", "domains"},
    {"evaluation"},
    {"kv", "weights"},
    {"longctx", "demo", "vllm"},
    {"cli"},
    {"__main__", "aquakv"},
]
# evaluation measures whatever cache it is given: of the lower layers it may use only these.
ONLY = {"evaluation": {"atomic_writes", "progress", "hf_compat", "lazy"}}
# The engine-independent codec layer (issue 20): no transformers import, directly or through aquakv modules.
CODEC_LAYER: tuple[str, ...] = ("aquakv.kv.codec", "aquakv.kv.aqua_codec", "aquakv.kv.kivi", "aquakv.kv.predictors")

# (rule, importer, imported[, name]) -> why it stays; fnmatch patterns, so an entry survives its owner's file moves
# (pv_tune.py -> pv/tune.py). Remove an entry once its import is gone: a stale entry fails the test.
ALLOWED: dict[tuple[str, ...], str] = {}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES["aquakv._C"] = PACKAGE / "_C"  # the compiled extension: a leaf


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "aquakv"


def layer(u: str) -> int:
    for i, units in enumerate(LAYERS):
        if u in units:
            return i
    raise AssertionError(f"unit {u!r} is in no layer of LAYERS: place it in docs/layout.md and in this test")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(module: str) -> list[tuple[str, str | None, bool]]:
    """(imported module, imported name or None, transformers?) for each import of `module`."""
    path = MODULES[module]
    if not path.suffix:
        return []
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, a.name.split(".")[0] == "transformers") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: (len(module.split(".")) - node.level + (path.name == "__init__.py"))]
                base = ".".join(package + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None, False) if sub in MODULES else
                             (base, a.name, base.split(".")[0] == "transformers"))
    return found


def graph() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for m in MODULES:
        for target, _, _ in imports_of(m):
            if target.split(".")[0] == "aquakv" and target != m:
                edges[m].add(target)
    return edges


def _matches(entry: tuple, key: tuple) -> bool:
    return len(entry) == len(key) and all(fnmatch.fnmatchcase(k, e) for e, k in zip(entry, key))


def _allowed(key: tuple) -> bool:
    return any(_matches(entry, key) for entry in ALLOWED)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of modules larger than one, as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan; the package is small enough for recursion
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
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def violations() -> list[tuple]:
    found = []
    edges = graph()
    for comp in cycles(edges):
        pairs = [(a, b) for a in comp for b in edges[a] if b in comp]
        found += [("cycle", a, b) for a, b in pairs]
    for m in MODULES:
        for target, name, _ in imports_of(m):
            if target.split(".")[0] != "aquakv" or target == m:
                continue
            mu, tu = unit(m), unit(target)
            if target == "aquakv" and name in ("_C",):
                continue
            if mu != tu and (layer(tu) >= layer(mu) or (mu in ONLY and tu not in ONLY[mu])):
                found.append(("upward", m, target))
            if name and name.startswith("_") and not name.startswith("__") and name != "_C":
                found.append(("private", m, target, name))
    return found


def test_no_cycle_no_upward_import_no_private_name_across_modules():
    bad = [v for v in violations() if not _allowed(v)]
    assert not bad, "import rules of docs/layout.md broken:\n" + "\n".join(map(str, bad))


def test_every_allow_list_entry_is_still_needed():
    found = violations()
    stale = [entry for entry in ALLOWED if not any(_matches(entry, v) for v in found)]
    assert not stale, f"fixed, so remove from ALLOWED: {stale}"


def test_codec_layer_reaches_no_transformers():
    edges = graph()
    for root in CODEC_LAYER:
        assert root in MODULES, f"CODEC_LAYER names {root}, which does not exist"
        seen, todo = set(), [root]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            hits = [t for t, _, tf in imports_of(m) if tf]
            assert not hits, f"{root} reaches transformers through {m} ({hits})"
            todo += [t for t in edges.get(m, ()) if t in MODULES]


@pytest.mark.parametrize("source, expected", [
    ("import aquakv.kv.aqua\n", ("upward", "aquakv.quantizer", "aquakv.kv.aqua")),
    ("from aquakv.grids import _load\n", ("private", "aquakv.quantizer", "aquakv.grids", "_load")),
])
def test_the_checker_catches_a_planted_violation(monkeypatch, source, expected):
    """No test that cannot fail: the same checker, given one bad import in quantizer.py, reports it."""
    real = pathlib.Path.read_text

    def planted(self, *a, **k):
        text = real(self, *a, **k)
        return text + source if self == MODULES["aquakv.quantizer"] else text

    monkeypatch.setattr(pathlib.Path, "read_text", planted)
    assert expected in violations()


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
