"""The layout's one rule between packages: `core` never imports `bot` or `notify`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_core_imports_neither_bot_nor_notify() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "core").rglob("*.py")
        if "migrations" not in p.parts and p.name != "__main__.py"
    )
    assert "core.lifecycle.updates" in modules and "core.store.store" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name.removesuffix('.__init__'))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'bot', 'notify'})\n"
        "print(' '.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"core pulls in: {result.stdout.strip()}"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (top level, functions, TYPE_CHECKING).

    ``from package import name`` counts as importing ``package.name`` when that is a module.
    """
    found: set[str] = set()
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != module}


def test_no_import_circles() -> None:
    paths = [
        p
        for top in ("core", "bot", "notify")
        for p in (ROOT / top).rglob("*.py")
        if "migrations" not in p.parts
    ]
    known = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, known) for p in paths}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                circles.append([*stack[stack.index(other) :], other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


ROOMS = {
    # room: the rooms of core it may import besides the shared vocabulary at core's top
    "core.store": set(),
    "core.repository": set(),
    "core.drivers": set(),
    "core.lifecycle": {"core.store", "core.repository"},
}


def test_rooms_of_core_import_one_way() -> None:
    paths = [p for p in (ROOT / "core").rglob("*.py") if "migrations" not in p.parts]
    known = {_module_name(p) for p in paths}
    wrong = []
    for path in paths:
        name = _module_name(path)
        room = next((r for r in ROOMS if name == r or name.startswith(r + ".")), None)
        for other in sorted(_imports(path, known)):
            target = next((r for r in ROOMS if other == r or other.startswith(r + ".")), None)
            if target is None or target == room:
                continue
            if room is None:
                # the vocabulary may use the manifest's wire format and nothing else of a room
                if other != "core.repository.manifest":
                    wrong.append(f"{name} -> {other}")
            elif target not in ROOMS[room]:
                wrong.append(f"{name} -> {other}")
    assert wrong == [], "imports against the direction of the rooms: " + ", ".join(wrong)
