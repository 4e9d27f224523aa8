"""The package layout README's ARCHITECTURE section promises, checked on the source (no imports run).

Every import counts, also the lazy ones inside functions: a cycle through a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("encoders", "index", "streams")
# The rooms of streams/ and the shared leaves, lowest first: a room may import only rooms before it.
LAYERS = ["encoders", "index", "streams.config", "streams.contracts", "streams.artifacts", "streams.kafka",
          "streams.worker", "streams.batch", "streams.jobs", "streams.bench", "streams.cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            mod = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[mod.removesuffix(".__init__")] = p
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _room(mod: str) -> str:
    parts = mod.split(".")
    return parts[0] if parts[0] != "streams" or len(parts) == 1 else ".".join(parts[:2])


def test_imports_flow_one_way_between_rooms():
    rank = {room: i for i, room in enumerate(LAYERS)}
    bad = []
    for mod, path in _modules().items():
        here = _room(mod)
        if here not in rank:
            assert mod == "streams", f"{mod} is in no room of the layout; add it to LAYERS and README"
            continue
        for imp in _imports(path):
            there = _room(imp)
            if there != here and rank.get(there, -1) > rank[here]:
                bad.append(f"{mod} imports {imp} ({there} is above {here})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_encoders_and_index_never_import_streams_and_nothing_imports_the_cli():
    for mod, path in _modules().items():
        imps = _imports(path)
        if mod.startswith(("encoders", "index")):
            assert not {i for i in imps if i.startswith("streams")}, mod
        if not mod.startswith("streams.cli"):
            assert not {i for i in imps if i.startswith("streams.cli")}, f"{mod} imports the CLI"
