"""Whether the hot path runs compiled: the mypyc extension modules `make native` puts next
to their sources, and the guard that imports the plain sources instead, all of them, as
soon as any source changed after the build (a stale build never runs). The guard is a
process-wide import hook on purpose: it must be in place before the first hot-path module is
imported, when the package is, before any object exists that could own it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


class _Sources(importlib.abc.MetaPathFinder):
    """Finds the listed modules as their `.py` files, ahead of the extension modules."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def _builds() -> dict[str, tuple[Path, Path]]:
    """Each compiled module of the package, by dotted name: its extension file and source."""
    found = {}
    for built in PACKAGE.rglob("*" + SUFFIX):
        stem = built.name.removesuffix(SUFFIX)
        name = ".".join((*built.parent.relative_to(PACKAGE.parent).parts, stem))
        if not stem.endswith("__mypyc"):
            found[name] = (built, built.with_name(stem + ".py"))
    return found


def _guard() -> str:
    """Run the sources when a build is stale; say how the hot path runs."""
    builds = _builds()
    if not builds:
        return "Python (`make native` compiles it with mypyc)"
    stale = [
        source.relative_to(PACKAGE.parent).as_posix()
        for built, source in builds.values()
        if source.is_file() and source.stat().st_mtime > built.stat().st_mtime
    ]
    if not stale:
        return f"compiled with mypyc ({len(builds)} modules)"
    sys.meta_path.insert(0, _Sources({name: source for name, (_, source) in builds.items()}))
    return f"Python: {stale[0]} changed after it was compiled (`make native` compiles it again)"


HOT_PATH = _guard()
