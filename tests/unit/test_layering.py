"""The package's layering, read from the source (every import, at any depth of a module,
`TYPE_CHECKING` ones too): a module imports only from its own layer or a lower one, and
config and routing never reach aiohttp or docker, not even through another module.

    config ← registry ← routing ← dataplane ← admin, overlays ← daemon ← cli

A module in no layer fails the test: place it in `LAYERS` when you add it. A wrong-way
import that must stay for now goes in `ALLOWED`, with the issue that removes it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "minimesh"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("minimesh", "minimesh.errors", "minimesh.compiled"),  # the package, its errors, the compiled-module guard
    ("minimesh.config",),
    ("minimesh.registry",),
    ("minimesh.routing",),
    ("minimesh.dataplane",),
    ("minimesh.admin", "minimesh.overlays"),  # the admin API and the run-time layers it serves
    ("minimesh.daemon",),
    ("minimesh.cli", "minimesh.background", "minimesh.__main__"),
)
ALLOWED: frozenset[tuple[str, str]] = frozenset()
"""(importer, imported) pairs allowed against the layering, each with a comment naming the
issue that removes it. None today."""
NEVER = {"minimesh.config": ("aiohttp", "docker"), "minimesh.routing": ("aiohttp", "docker")}
"""Third-party packages a layer must not reach, directly or through the modules it imports."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int | None:
    """The layer of module `name`: the one naming it or its closest package (the top package
    names only its own `__init__`)."""
    best: tuple[int, int] | None = None
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            covers = name == prefix or (prefix != "minimesh" and within(name, prefix))
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), number)
    return None if best is None else best[1]


def imports(name: str) -> set[str]:
    """Every module `name` imports: minimesh modules by their full name, others by top package."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {item if within(item, "minimesh") else item.split(".")[0] for item in found}


GRAPH = {name: imports(name) for name in MODULES}


def reaches(name: str) -> set[str]:
    """Every module `name` depends on, through any chain of minimesh modules."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for item in GRAPH.get(todo.pop(), set()):
            if item not in seen:
                seen.add(item)
                if item in GRAPH:
                    todo.append(item)
    return seen


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in MODULES if layer_of(name) is None]
    assert not unplaced, f"place these in LAYERS: {', '.join(unplaced)}"


def test_no_import_points_up_the_layers() -> None:
    wrong = []
    for name, imported in GRAPH.items():
        here = layer_of(name)
        assert here is not None
        for target in sorted(imported):
            there = layer_of(target) if within(target, "minimesh") else None
            if there is not None and there > here and (name, target) not in ALLOWED:
                wrong.append(f"{name} (layer {here}) imports {target} (layer {there})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_config_and_routing_never_reach_aiohttp_or_docker() -> None:
    wrong = []
    for name in GRAPH:
        for prefix, banned in NEVER.items():
            if within(name, prefix):
                wrong += [f"{name} reaches {package}" for package in banned if package in reaches(name)]
    assert not wrong, "\n".join(wrong)


def test_the_reader_sees_imports_at_every_depth() -> None:
    """The test itself: the imports it must catch are seen (inside functions and TYPE_CHECKING too)."""
    assert "minimesh.dataplane.proxy" in GRAPH["minimesh.dataplane.listeners"]
    assert "docker" in reaches("minimesh.registry.watch")
    assert "aiohttp" in reaches("minimesh.daemon")
    assert {"minimesh.config.model", "minimesh.routing.snapshot"} <= GRAPH["minimesh.dataplane.fault"]
    assert layer_of("minimesh.dataplane.capture.netns") == layer_of("minimesh.dataplane")
    assert layer_of("minimesh.unplaced") is None
