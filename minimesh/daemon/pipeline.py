"""The one pipeline from config to what is served or reported: read the files, load them with
the run-time layers on top, check, compile, run the RouteTests. `up` (each converge pass),
`validate` and `explain` all go through `run_pipeline`; they differ only in the `Ask` they pass."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from minimesh.config.check import check_mesh
from minimesh.config.load import Layer, Loaded, load_layers
from minimesh.config.source import Document, expand, read_paths
from minimesh.errors import ConfigError, Problem
from minimesh.registry.model import Workload
from minimesh.registry.static import workloads_of
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.offline import placeholders
from minimesh.routing.snapshot import Snapshot
from minimesh.routing.verify import run_route_tests


@dataclass(frozen=True, slots=True)
class Files:
    """The config files as read once: one layer of documents per path (a later one replaces
    same-named documents of an earlier one), the problems reading found, and the files read."""

    layers: tuple[tuple[Document, ...], ...] = ()
    problems: tuple[Problem, ...] = ()
    sources: tuple[str, ...] = ()


def read_files(paths: Iterable[str]) -> Files:
    """Read every config file under `paths` (files, and the YAML files directly in folders)."""
    paths = tuple(paths)
    layers: list[tuple[Document, ...]] = []
    problems: list[Problem] = []
    for path in paths:
        documents, found = read_paths([path])
        layers.append(tuple(documents))
        problems.extend(found)
    files, _ = expand(paths)
    return Files(tuple(layers), tuple(problems), tuple(str(f) for f in files))


@dataclass(frozen=True, slots=True)
class Ask:
    """What a caller asks of the pipeline besides the files."""

    layers: tuple[Layer, ...] = ()
    """Run-time layers over the files: applied documents, then overlays."""
    workloads: tuple[Workload, ...] = ()
    """Workloads besides the config's WorkloadEntries: discovered containers, `--workloads`."""
    generation: int = 0
    offline_ports: tuple[int, ...] | None = None
    """Set: decide offline (`validate`, `explain`): placeholders stand for the services no
    workload backs, exposing these ports, and a config the check finds errors in is compiled
    all the same. None: only a config without errors is compiled (`up`)."""
    route_tests: bool = False
    """Run the config's RouteTests on an offline snapshot; it is compiled only when there are any."""


@dataclass(frozen=True, slots=True)
class Passed:
    """What a run found: the loaded config, every problem (load, check, RouteTests, in that
    order) and the snapshot, if one was asked for and compiled."""

    loaded: Loaded
    problems: tuple[Problem, ...]
    snapshot: Snapshot | None
    files: Files

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


@dataclass(frozen=True, slots=True)
class Compiled:
    """A config that loaded and checked without errors, compiled: what a pass swaps in, and the
    files it was read from."""

    snapshot: Snapshot
    files: Files
    warnings: tuple[Problem, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return self.files.sources


def url_port(url: str) -> int:
    """The port a request for `url` goes to (80 when it names none); ValueError when the port
    is not a number in 0-65535."""
    return urlsplit(url if "://" in url else f"http://{url}").port or 80


def _route_test_ports(loaded: Loaded, problems: list[Problem]) -> tuple[int, ...]:
    """The ports the RouteTests' requests go to; an unreadable one is an error at its test."""
    ports: list[int] = []
    for test in loaded.mesh.route_tests:
        try:
            ports.append(url_port(test.request.url))
        except ValueError as exc:
            message = f"cannot read url '{test.request.url}': {exc}; write http://HOST:PORT/PATH"
            problems.append(Problem(test.meta.location, "error", message, test.meta.ref, "request.url"))
    return tuple(ports)


def run_pipeline(files: Files, ask: Ask) -> Passed:
    """Load `files` with `ask.layers` on top, check, compile, run the RouteTests: each stage only
    when the one before it leaves something to do it on."""
    loaded = load_layers([*(list(layer) for layer in files.layers), *ask.layers], list(files.problems))
    problems = list(loaded.problems)
    if loaded.errors:
        return Passed(loaded, tuple(problems), None, files)
    problems += check_mesh(loaded.mesh, loaded.documents)
    offline = ask.offline_ports is not None or ask.route_tests
    if ask.route_tests and not loaded.mesh.route_tests:
        return Passed(loaded, tuple(problems), None, files)
    if not offline and any(p.severity == "error" for p in problems):
        return Passed(loaded, tuple(problems), None, files)
    workloads = (*workloads_of(loaded.mesh), *ask.workloads)
    if offline:
        ports = (*(ask.offline_ports or ()), *(_route_test_ports(loaded, problems) if ask.route_tests else ()))
        workloads += placeholders(loaded.mesh, workloads, ports)
    snapshot = compile_snapshot(loaded.mesh, workloads, generation=ask.generation)
    if ask.route_tests:
        problems += run_route_tests(snapshot)
    return Passed(loaded, tuple(problems), snapshot, files)


def compiled(passed: Passed) -> Compiled:
    """What `up` swaps in from a run; ConfigError carrying every error-level problem."""
    errors = passed.errors
    if errors or passed.snapshot is None:
        raise ConfigError(errors)
    warnings = tuple(p for p in passed.problems if p.severity == "warning")
    return Compiled(passed.snapshot, passed.files, warnings)


def compile_config(
    paths: Iterable[str], generation: int, discovered: Iterable[Workload] = (), layers: Iterable[Layer] = ()
) -> Compiled:
    """`paths` read, with `layers` on top and the `discovered` containers, through the pipeline:
    ConfigError carrying every error-level problem."""
    ask = Ask(layers=tuple(layers), workloads=tuple(discovered), generation=generation)
    return compiled(run_pipeline(read_files(paths), ask))
