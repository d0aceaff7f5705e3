"""The daemon's pipeline, one pass from inputs to what it swaps in: load the files with the
run-time layers on top, check, compile the default snapshot and one per overlay scope."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from minimesh.config.check import check_mesh
from minimesh.config.load import Layer, load_paths
from minimesh.config.source import expand
from minimesh.errors import ConfigError, Problem
from minimesh.registry.model import Workload
from minimesh.registry.static import workloads_of
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class Compiled:
    """A config that loaded and checked without errors, compiled: what a pass swaps in."""

    snapshot: Snapshot
    sources: tuple[str, ...]
    warnings: tuple[Problem, ...]


def compile_config(
    paths: Iterable[str], generation: int, discovered: Iterable[Workload] = (), layers: Iterable[Layer] = ()
) -> Compiled:
    """Load, check and compile `paths` (with `layers` on top) and the `discovered` containers;
    ConfigError carrying every error-level problem."""
    paths = tuple(paths)
    loaded = load_paths(paths, layers)
    problems = list(loaded.problems)
    if not loaded.errors:
        problems += check_mesh(loaded.mesh, loaded.documents)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors)
    snapshot = compile_snapshot(loaded.mesh, (*workloads_of(loaded.mesh), *discovered), generation=generation)
    files, _ = expand(paths)
    warnings = tuple(p for p in problems if p.severity == "warning")
    return Compiled(snapshot, tuple(str(f) for f in files), warnings)
