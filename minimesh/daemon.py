"""The daemon `minimesh up` runs: load and compile the config; serve the ingress gateway, the
explicit sidecars and the admin API; watch the files and swap in each good reload (a bad one,
or one minimesh fails on, keeps the last good snapshot serving). One `asyncio.TaskGroup` owns
its tasks, each supervised: only a deliberate stop ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from watchfiles import Change, awatch

from minimesh.admin.app import ConfigState, build_app
from minimesh.admin.metrics import Metrics
from minimesh.config.check import check_mesh
from minimesh.config.labels import SIDECAR_PORT_ANNOTATION
from minimesh.config.load import Layer, load_paths
from minimesh.config.source import Document, expand, parse_text
from minimesh.dataplane.accesslog import AccessLog
from minimesh.dataplane.capture.manager import NetnsCapture
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Listener
from minimesh.dataplane.listeners import Serving
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import Upstreams
from minimesh.errors import ConfigError, Location, MinimeshError, Problem
from minimesh.overlays import Layers, Overlay
from minimesh.registry.model import Workload
from minimesh.registry.static import workloads_of
from minimesh.registry.watch import Discovered, DockerUnavailable, DockerWatcher, connect
from minimesh.routing.compile import compile_snapshot
from minimesh.routing.snapshot import Snapshot

log = logging.getLogger("minimesh")

SIDECAR_HOST = "127.0.0.1"
"""Explicit sidecars listen on loopback only: local processes reach them through HTTP_PROXY."""
DEBOUNCE_MS = 50
STEP_MS = 10
"""A burst of file changes is one reload: wait `STEP_MS` for more, at most `DEBOUNCE_MS` in all."""
CONFIG_SUFFIXES = frozenset({".yaml", ".yml"})
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
"""A background task that failed starts again after RESTART_DELAY, twice as long after each
failure in a row, at most RESTART_DELAY_MAX; a run that lasted that long starts the count over."""

T = TypeVar("T")


GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic collector's thresholds while serving (CPython's are 700, 10, 10): requests leave
almost no cyclic garbage, so collecting the youngest generation every 700 allocations mostly
walks requests still in flight."""


def settle_heap() -> None:
    """Before serving: collect once, then move everything alive (modules, the config, the first
    snapshot) where the cyclic collector never walks it again, and collect less often.

    Only here, before any connection exists: a later `gc.freeze()` would also pin what is in
    flight, and a connection's cycles (its protocol and parser) would then never be collected.
    Snapshots hold no cycles, so a replaced one is freed by reference counting, frozen or not."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class DaemonError(MinimeshError):
    """Why the daemon cannot start, as one line that names the cause and the fix."""


@dataclass(frozen=True, slots=True)
class Options:
    """What `minimesh up` was asked to do."""

    paths: tuple[str, ...] = ("mesh.yaml",)
    bind: str = "127.0.0.1"
    gateway_port: int = 8080
    admin_port: int = 15000
    debug_headers: bool = False
    seed: int | None = None
    docker: bool = False
    docker_labels: tuple[str, ...] = ()
    capture: str = "explicit"
    """`netns` (transparent, in each container) or `explicit` (HTTP_PROXY sidecars)."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A config that loaded and checked without errors, compiled: what a reload swaps in."""

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


def sidecars_of(workloads: Iterable[Workload]) -> dict[int, Workload]:
    """The explicit sidecars wanted, by port: one per workload annotated with a sidecar port."""
    wanted: dict[int, Workload] = {}
    for workload in workloads:
        if workload.sidecar_port is not None and workload.sidecar_port not in wanted:
            wanted[workload.sidecar_port] = workload
    return wanted


def bind_problem(exc: OSError, host: str, port: int, fix: str) -> str:
    """The one line a failed bind is reported as."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use; {fix}"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} (ports below 1024 need root); {fix}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: not an address of this machine; pass --bind"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; {fix}"


def sidecar_fix(workload: Workload) -> str:
    return f"change the {SIDECAR_PORT_ANNOTATION} annotation of WorkloadEntry/{workload.name}"


def watch_filter(paths: Iterable[str]) -> tuple[tuple[Path, ...], Callable[[Change, str], bool]]:
    """The folders to watch for `paths` (a file's folder, or the folder itself), and a filter
    that keeps the changes that concern them (the file, or a YAML file directly in the folder)."""
    files: set[Path] = set()
    folders: set[Path] = set()
    for raw in paths:
        path = Path(raw).resolve()
        (folders if path.is_dir() else files).add(path)

    def concerns(change: Change, changed: str) -> bool:
        path = Path(changed)
        return path in files or (path.parent in folders and path.suffix in CONFIG_SUFFIXES)

    watched = tuple(sorted(folders | {f.parent for f in files}))
    return watched, concerns


class Daemon:
    """The gateway, the sidecars and the admin API over one `Current[Snapshot]`."""

    def __init__(self, options: Options, first: Compiled, docker: Any = None) -> None:
        self.options = options
        self.current = Current(first.snapshot)
        self.config = ConfigState(first.sources, time.time())
        self.upstreams = Upstreams()
        self.metrics = Metrics()
        self.access_log = AccessLog()
        self.proxy = Proxy(
            self.current,
            self.upstreams,
            rng=random.Random(options.seed),
            observers=(self.metrics, self.access_log),
            openers=(self.metrics.opened,),
            debug_headers=options.debug_headers,
        )
        self.gateway: Serving | None = None
        self.sidecars: dict[int, Serving] = {}
        self.capture = NetnsCapture(self.proxy) if options.capture == "netns" else None
        self.docker = docker
        self.discovered = Discovered()
        self.layers = Layers()
        self._compiling = asyncio.Lock()
        self._layers_changed = asyncio.Event()
        self.failed: dict[int, str] = {}
        """Sidecar ports a reload could not listen on, and why (the daemon is then not ready)."""
        self.ready = False
        self.reloads_rejected = 0
        """Reloads of the files refused, the last good config serving on."""
        self.internal_errors = 0
        """Exceptions minimesh did not expect (bugs), each logged with its traceback."""
        self._admin: web.AppRunner | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._stopping = asyncio.Event()
        self._unwatch = asyncio.Event()
        self._watched = False
        self._discovery: DockerWatcher | None = None

    @property
    def scoped(self) -> Mapping[str, Snapshot]:
        """Snapshots for scoped overlays: requests with `x-minimesh-test: SCOPE` use them."""
        return self.proxy.scoped

    @scoped.setter
    def scoped(self, snapshots: Mapping[str, Snapshot]) -> None:
        self.proxy.scoped = snapshots

    def listeners(self) -> list[Listener]:
        captured = self.capture.servings() if self.capture else []
        servings = [self.gateway, *self.sidecars.values(), *captured]
        return [s.listener for s in servings if s is not None]

    def stop(self) -> None:
        """Begin a clean stop (SIGTERM, SIGINT)."""
        self._stopping.set()

    # ---- running

    async def run(self) -> None:
        """Serve until `stop()`; DaemonError if a port cannot be listened on at start."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.set_exception_handler(self._loop_error)
        try:
            self._configure_access_log(self.current.get())
            settle_heap()
            await self._listen()
            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(
                    self._supervise("watch config files", self._watch), name="watch config files"
                )
                self._tasks = tasks
                following: list[asyncio.Task[None]] = []
                if self.docker is not None:
                    await self._first_discovery()
                    following.append(tasks.create_task(self._supervise("follow Docker events", self._follow_docker),
                                                       name="follow Docker events"))  # fmt: skip
                following.append(tasks.create_task(self._supervise("expire overlays", self._expire_overlays),
                                                   name="expire overlays"))  # fmt: skip
                await asyncio.sleep(0)  # the watcher registers with the OS before we say ready
                self.ready = not self.failed
                log.info("minimesh: ready; watching %s for changes", ", ".join(self.options.paths))
                await self._stopping.wait()
                log.info("minimesh: stopping")
                self.ready = False
                self._unwatch.set()
                for task in (watcher, *following):
                    task.cancel()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            loop.set_exception_handler(None)
            await self._close()

    # ---- failures minimesh did not expect

    def _bug(self, what: str) -> None:
        """Called in an `except` block: an exception minimesh did not expect is a bug. It is
        logged with its traceback and counted (`internalErrors`); the daemon carries on."""
        self.internal_errors += 1
        log.exception("minimesh: internal error %s (a bug in minimesh: please report it with this traceback)", what)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's handler of exceptions no task awaited (a connection's task that raised):
        a bug, logged and counted. A network error, or a notice without an exception, is the
        loop's to report as usual."""
        error = context.get("exception")
        if error is None or isinstance(error, OSError):
            loop.default_exception_handler(context)
            return
        self.internal_errors += 1
        log.error("minimesh: internal error: %s (a bug in minimesh: please report it with this traceback)",
                  context.get("message", "unhandled exception"), exc_info=error)  # fmt: skip

    async def _supervise(
        self, name: str, job: Callable[[], Coroutine[Any, Any, None]], *, restart: bool = True
    ) -> None:
        """Run one background job of the daemon so that it never ends the TaskGroup: when it
        raises, the bug is logged and counted, and the job starts again (unless `restart` is
        False; so does one that ends before the daemon stops), later each time it fails in a
        row, until the daemon stops."""
        delay = RESTART_DELAY
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                await job()
                if not restart or self._stopping.is_set():
                    return
                log.error("minimesh: the background task '%s' ended while the daemon runs", name)
            except Exception:
                self._bug(f"in the background task '{name}'")
                if not restart:
                    return
            if time.monotonic() - began >= RESTART_DELAY_MAX:
                delay = RESTART_DELAY
            log.error("minimesh: restarting the background task '%s' in %.0f s", name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    async def _off_loop(self, source: str, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` in a thread, off the request path: loading and compiling config.
        ConfigError passes; any other exception is a bug, logged and counted, and refuses the
        config as a ConfigError at `source`: the config in force keeps serving."""
        try:
            return await asyncio.to_thread(work, *args)
        except ConfigError:
            raise
        except Exception as exc:
            self._bug(f"while loading {source}")
            message = (f"internal error in minimesh while loading this config: {exc!r}; the daemon's log has "
                       "its traceback (please report it)")  # fmt: skip
            raise ConfigError([Problem(Location(source, 1, 1), "error", message)]) from exc

    async def _listen(self) -> None:
        options = self.options
        snapshot = self.current.get()
        listener = Listener("gateway", options.gateway_port, snapshot.ingress_gateways, address=options.bind)
        gateway = Serving(self.proxy, listener)
        self.gateway = gateway
        try:
            await gateway.start(options.bind, options.gateway_port)
        except OSError as exc:
            raise DaemonError(bind_problem(exc, options.bind, options.gateway_port, "pass --gateway-port")) from exc
        gateway.listener = replace(listener, port=gateway.address[1])
        bound = (
            ", ".join(snapshot.ingress_gateways)
            or "none: no Gateway selects istio: ingressgateway, so every request gets 404"
        )
        log.info("minimesh: gateway on http://%s:%d (Gateway %s)", options.bind, gateway.address[1], bound)
        for port, workload in sidecars_of(snapshot.workloads).items():
            problem = await self._start_sidecar(port, workload)
            if problem:
                raise DaemonError(problem)
        self._admin = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self._admin.setup()
        site = web.TCPSite(self._admin, options.bind, options.admin_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise DaemonError(bind_problem(exc, options.bind, options.admin_port, "pass --admin-port")) from exc
        log.info("minimesh: admin API on http://%s:%d", options.bind, options.admin_port)

    async def _start_sidecar(self, port: int, workload: Workload) -> str:
        """Listen for `workload`'s outbound traffic on 127.0.0.1:`port`; the problem, or ""."""
        serving = Serving(self.proxy, Listener("sidecar", port, workload=workload, address=SIDECAR_HOST))
        try:
            await serving.start(SIDECAR_HOST, port)
        except OSError as exc:
            return bind_problem(exc, SIDECAR_HOST, port, sidecar_fix(workload))
        self.sidecars[port] = serving
        log.info("minimesh: sidecar of %s on %s:%d (HTTP_PROXY=http://%s:%d)", workload, SIDECAR_HOST, port,
                 SIDECAR_HOST, port)  # fmt: skip
        return ""

    async def _close(self) -> None:
        servings = [s for s in (self.gateway, *self.sidecars.values()) if s is not None]
        await asyncio.gather(*(serving.stop() for serving in servings))
        if self.capture is not None:
            await self.capture.close()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.proxy.close()
        self.access_log.close()

    # ---- reloading

    async def _watch(self) -> None:
        """Reload on each burst of changes to the files (and once more when it starts again
        after a failure: a change may have been missed meanwhile)."""
        if self._watched:
            await self.reload()
        self._watched = True
        folders, concerns = watch_filter(self.options.paths)
        changes = awatch(*folders, watch_filter=concerns, debounce=DEBOUNCE_MS, step=STEP_MS,
                         stop_event=self._unwatch, recursive=False)  # fmt: skip
        async for batch in changes:
            log.debug("minimesh: changed: %s", ", ".join(sorted(path for _, path in batch)))
            await self.reload()

    async def reload(self) -> None:
        """Load, check and compile the files again, off the request path; swap in the result,
        or keep the snapshot in force and remember why the new one was refused."""
        began = time.monotonic()
        try:
            async with self._compiling:
                generation = self.current.get().generation + 1
                compiled = await self._compile(generation, self.layers.layers())
                scoped = await self._scoped(generation)
                self._swap(compiled.snapshot)
                self.scoped = scoped
                self.config = ConfigState(compiled.sources, time.time())
        except ConfigError as exc:
            self.reloads_rejected += 1
            lines = tuple(str(p) for p in exc.problems)
            for line in lines:
                log.error("%s", line)
            kept = self.current.get().generation
            log.error("minimesh: reload refused (%d errors); still serving generation %d", len(lines), kept)
            self.config = replace(self.config, error=lines)
            return
        for warning in compiled.warnings:
            log.warning("%s", warning)
        await self._reconcile_sidecars(compiled.snapshot)
        await self._reconcile_capture()
        took = (time.monotonic() - began) * 1000
        log.info("minimesh: reloaded: generation %d live in %.0f ms", generation, took)

    def _swap(self, snapshot: Snapshot) -> None:
        """Put the new snapshot in force, with the listeners that read it, in one loop step."""
        self.current.swap(snapshot)
        if self.gateway is not None and self.gateway.listener.gateways != snapshot.ingress_gateways:
            self.gateway.listener = replace(self.gateway.listener, gateways=snapshot.ingress_gateways)
        wanted = sidecars_of(snapshot.workloads)
        for port, serving in self.sidecars.items():
            workload = wanted.get(port)
            if workload is not None and serving.listener.workload != workload:
                serving.listener = replace(serving.listener, workload=workload)
        self._configure_access_log(snapshot)

    async def _reconcile_sidecars(self, snapshot: Snapshot) -> None:
        """Stop the sidecars no workload asks for any more; start the new ones."""
        wanted = sidecars_of(snapshot.workloads)
        for port in [p for p in self.sidecars if p not in wanted]:
            serving = self.sidecars.pop(port)
            log.info("minimesh: sidecar of %s on %s:%d stopped", serving.listener.name, SIDECAR_HOST, port)
            await serving.stop()
        self.failed = {}
        for port, workload in wanted.items():
            if port not in self.sidecars:
                problem = await self._start_sidecar(port, workload)
                if problem:
                    log.error("minimesh: error: %s", problem)
                    self.failed[port] = problem
        self.ready = not self.failed and not self._stopping.is_set()

    # ---- applied documents and overlays

    async def _compile(self, generation: int, layers: Iterable[Layer]) -> Compiled:
        """The files with `layers` on top and the containers known, compiled off the loop."""
        source = self.options.paths[0]
        return await self._off_loop(
            source, compile_config, self.options.paths, generation, self.discovered.workloads, tuple(layers)
        )

    async def _scoped(self, generation: int) -> dict[str, Snapshot]:
        """A snapshot per overlay scope: the files, the unscoped layers, then the scope's own."""
        scoped = {}
        for scope in sorted(self.layers.scopes()):
            found = await self._compile(generation, self.layers.layers(scope))
            scoped[scope] = found.snapshot
        return scoped

    async def _relayer(self, applied: dict[tuple[str, str, str], Document] | None = None,
                       overlay: Overlay | None = None, removed: str | None = None) -> int:  # fmt: skip
        """Compile with a change of layers and swap it in; ConfigError leaves everything as it was."""
        async with self._compiling:
            generation = self.current.get().generation + 1
            trial = Layers(dict(self.layers.applied if applied is None else applied), dict(self.layers.overlays))
            if overlay is not None:
                trial.overlays[overlay.id] = overlay
            if removed is not None:
                trial.overlays.pop(removed, None)
            compiled = await self._compile(generation, trial.layers())
            previous, self.layers = self.layers, replace(self.layers, applied=trial.applied, overlays=trial.overlays)
            try:
                scoped = await self._scoped(generation)
            except ConfigError:
                self.layers = previous
                raise
            self._swap(compiled.snapshot)
            self.scoped = scoped
            self.config = ConfigState(compiled.sources, time.time())
        self._layers_changed.set()
        await self._reconcile_sidecars(compiled.snapshot)
        await self._reconcile_capture()
        return generation

    async def _parse(self, text: str, source: str) -> list[Document]:
        """The documents of an `apply` or overlay body, parsed off the loop; ConfigError if none
        or any problem."""
        documents, problems = await self._off_loop(source, parse_text, text, source)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ConfigError(errors)
        if not documents:
            raise ConfigError([Problem(Location(source, 1, 1), "error", "no documents to apply")])
        return documents

    async def apply(self, text: str, source: str) -> int:
        """`minimesh apply`: these documents replace or join the applied layer; the new generation."""
        documents = await self._parse(text, source)
        generation = await self._relayer(applied=self.layers.with_applied(documents))
        log.info("minimesh: applied %s: generation %d", ", ".join(d.ref for d in documents), generation)
        return generation

    async def reset_applied(self) -> int:
        generation = await self._relayer(applied={})
        log.info("minimesh: applied documents dropped: generation %d", generation)
        return generation

    async def add_overlay(self, text: str, ttl: float | None, scope: str | None) -> tuple[str, int]:
        """A test overlay over the files; its id and the generation it is live in."""
        documents = await self._parse(text, "overlay")
        expires = time.monotonic() + ttl if ttl else None
        overlay = Overlay(self.layers.next_id(), tuple(documents), expires, scope or None)
        generation = await self._relayer(overlay=overlay)
        log.info("minimesh: overlay %s (%s) live in generation %d", overlay.id, scope or "every request", generation)
        return overlay.id, generation

    async def remove_overlay(self, overlay_id: str) -> bool:
        if overlay_id not in self.layers.overlays:
            return False
        await self._relayer(removed=overlay_id)
        return True

    async def _expire_overlays(self) -> None:
        while True:
            expiry = self.layers.next_expiry()
            wait = None if expiry is None else max(0.0, expiry - time.monotonic())
            self._layers_changed.clear()
            try:
                await asyncio.wait_for(self._layers_changed.wait(), wait)
                continue
            except TimeoutError:
                pass
            for overlay_id in self.layers.expired(time.monotonic()):
                log.info("minimesh: overlay %s expired", overlay_id)
                try:
                    await self.remove_overlay(overlay_id)
                except ConfigError as exc:
                    log.error("minimesh: removing overlay %s: %s", overlay_id, exc)

    # ---- Docker discovery

    def _docker_watcher(self) -> DockerWatcher:
        return DockerWatcher(self.docker, self._discovered, labels=self.options.docker_labels)

    async def _first_discovery(self) -> None:
        """List the containers before saying ready, so the first requests find them."""
        discovery = self._discovery = self._docker_watcher()
        discovery.records = await asyncio.to_thread(discovery.list_containers)
        self.discovered = discovery.discovered()
        for skipped in self.discovered.skipped:
            log.warning("minimesh: %s", skipped)
        await self._recompile("containers listed")

    async def _follow_docker(self) -> None:
        """Follow Docker's events with the watcher that listed the containers; after a failure,
        with a new one, which lists them again."""
        discovery, self._discovery = self._discovery, None
        await (discovery or self._docker_watcher()).run()

    def _discovered(self, discovered: Discovered) -> None:
        """The watcher's callback: the set of containers changed; recompile off this call."""
        if discovered == self.discovered:
            return
        self.discovered = discovered
        if self._tasks is not None and not self._stopping.is_set():
            recompile = self._supervise(
                "recompile for containers", lambda: self._recompile("containers changed"), restart=False
            )
            self._tasks.create_task(recompile, name="recompile for containers")

    async def _recompile(self, why: str) -> None:
        """The same config with the current containers, swapped in; then capture follows."""
        async with self._compiling:
            snapshot = self.current.get()
            mesh = snapshot.mesh
            workloads = (*workloads_of(mesh), *self.discovered.workloads)
            compiled = await asyncio.to_thread(compile_snapshot, mesh, workloads, generation=snapshot.generation + 1)
            self._swap(compiled)
            if self.scoped:
                self.scoped = {
                    scope: await asyncio.to_thread(
                        compile_snapshot, found.mesh, workloads, generation=compiled.generation
                    )
                    for scope, found in self.scoped.items()
                }
        names = ", ".join(w.name for w in self.discovered.workloads) or "none"
        log.info("minimesh: %s: generation %d, containers: %s", why, compiled.generation, names)
        await self._reconcile_capture()

    async def _reconcile_capture(self) -> None:
        if self.capture is not None:
            await self.capture.reconcile(self.current.get().workloads)

    def _configure_access_log(self, snapshot: Snapshot) -> None:
        config = snapshot.mesh.mesh_config
        self.access_log.configure(config.access_log_file, config.access_log_encoding)

    def __repr__(self) -> str:
        return (
            f"<Daemon generation={self.current.get().generation} sidecars={sorted(self.sidecars)} "
            f"ready={self.ready} failed={sorted(self.failed)}>"
        )


async def serve(options: Options) -> None:
    """Run the daemon until SIGTERM or SIGINT; DaemonError when it cannot start."""
    try:
        first = compile_config(options.paths, 1)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s", problem)
        files = " ".join(f"-f {p}" for p in options.paths)
        count = len(exc.problems)
        raise DaemonError(f"the config has {count} errors (above); fix them (minimesh validate {files})") from exc
    for warning in first.warnings:
        log.warning("%s", warning)
    log.info("minimesh: loaded %s: generation 1, %d services, %d workloads", ", ".join(first.sources),
             len(first.snapshot.services), len(first.snapshot.workloads))  # fmt: skip
    docker = None
    if options.docker:
        try:
            docker = await asyncio.to_thread(connect)
        except DockerUnavailable as exc:
            if options.capture == "netns":
                raise DaemonError(f"--capture netns: {exc}") from exc
            log.warning("minimesh: %s; serving WorkloadEntry workloads only", exc)
    await Daemon(options, first, docker).run()
