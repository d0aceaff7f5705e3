"""The daemon `minimesh up` runs: the gateway, the explicit sidecars and the admin API over one
`Current[Snapshot]`, and the converge task (daemon/converge.py). Every trigger here (a file
change, `apply`, an overlay added, expired or deleted, a Docker event) only records what changed
and wakes that task; it runs the pipeline, swaps the default and scoped snapshots in one step,
then reconciles listeners and capture. A bad config, or one minimesh fails on, keeps the last
good snapshots serving. Each background task is supervised: only a deliberate stop ends it.
`settle_heap` is the one process-wide setting made here, on purpose: the interpreter has one
collector, so no object can own it; `run` sets it once before serving (measured only as part of
the hot-path checkpoint f240139 in `make bench`, not alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from watchfiles import Change, awatch

from minimesh.admin.app import ConfigState, build_app
from minimesh.admin.metrics import Metrics
from minimesh.config.source import Document, parse_text
from minimesh.daemon.converge import Converger
from minimesh.daemon.listeners import DaemonError, ListenerSet, bind_problem
from minimesh.daemon.pipeline import Compiled, compile_config
from minimesh.dataplane.accesslog import AccessLog
from minimesh.dataplane.capture.manager import NetnsCapture
from minimesh.dataplane.current import Current
from minimesh.dataplane.exchange import Listener
from minimesh.dataplane.proxy import Proxy
from minimesh.dataplane.upstream import Upstreams
from minimesh.errors import ConfigError, Location, Problem
from minimesh.overlays import Layers, Overlay
from minimesh.registry.watch import Discovered, DockerUnavailable, DockerWatcher, connect
from minimesh.routing.snapshot import Snapshot

log = logging.getLogger("minimesh")

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


class Supervisor:
    """Failures minimesh did not expect (bugs): each logged with its traceback and counted
    (`internalErrors`), the daemon carrying on; and the background tasks, restarted when they fail."""

    def __init__(self) -> None:
        self.internal_errors = 0
        self.stopping = asyncio.Event()

    def bug(self, what: str) -> None:
        """Called in an `except` block: logged with the traceback and counted."""
        self.internal_errors += 1
        log.exception("minimesh: internal error %s (a bug in minimesh: please report it with this traceback)", what)

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
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

    async def supervise(self, name: str, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one background job so that it never ends the TaskGroup: when it raises, the bug is
        logged and counted, and the job starts again (so does one that ends before the daemon
        stops), later each time it fails in a row, until the daemon stops."""
        delay = RESTART_DELAY
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                await job()
                if self.stopping.is_set():
                    return
                log.error("minimesh: the background task '%s' ended while the daemon runs", name)
            except Exception:
                self.bug(f"in the background task '{name}'")
            if time.monotonic() - began >= RESTART_DELAY_MAX:
                delay = RESTART_DELAY
            log.error("minimesh: restarting the background task '%s' in %.0f s", name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    async def off_loop(self, source: str, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` in a thread, off the request path: loading and compiling config.
        ConfigError passes; any other exception is a bug, logged and counted, and refuses the
        config as a ConfigError at `source`: the config in force keeps serving."""
        try:
            return await asyncio.to_thread(work, *args)
        except ConfigError:
            raise
        except Exception as exc:
            self.bug(f"while loading {source}")
            message = (f"internal error in minimesh while loading this config: {exc!r}; the daemon's log has "
                       "its traceback (please report it)")  # fmt: skip
            raise ConfigError([Problem(Location(source, 1, 1), "error", message)]) from exc


async def parse_documents(supervisor: Supervisor, text: str, source: str) -> list[Document]:
    """The documents of an `apply` or overlay body, parsed off the loop; ConfigError if none
    or any problem."""
    documents, problems = await supervisor.off_loop(source, parse_text, text, source)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors)
    if not documents:
        raise ConfigError([Problem(Location(source, 1, 1), "error", "no documents to apply")])
    return documents


def configure_access_log(access_log: AccessLog, snapshot: Snapshot) -> None:
    config = snapshot.mesh.mesh_config
    access_log.configure(config.access_log_file, config.access_log_encoding)


def with_overlay(overlay: Overlay | None = None, removed: str | None = None) -> Callable[[Layers], Layers]:
    """A change of layers: `overlay` added, or the overlay `removed` dropped; the rest kept."""

    def change(layers: Layers) -> Layers:
        overlays = dict(layers.overlays)
        if overlay is not None:
            overlays[overlay.id] = overlay
        if removed is not None:
            overlays.pop(removed, None)
        return replace(layers, applied=dict(layers.applied), overlays=overlays)

    return change


def with_applied(documents: list[Document] | None) -> Callable[[Layers], Layers]:
    """A change of layers: `documents` replace or join the applied ones (None: drop them all)."""

    def change(layers: Layers) -> Layers:
        applied = {} if documents is None else layers.with_applied(documents)
        return replace(layers, applied=applied, overlays=dict(layers.overlays))

    return change


async def expire_overlays(daemon: Daemon) -> None:
    """Drop each overlay when its time to live is up."""
    converger = daemon.converger
    while True:
        expiry = daemon.layers.next_expiry()
        wait = None if expiry is None else max(0.0, expiry - time.monotonic())
        converger.layers_changed.clear()
        try:
            await asyncio.wait_for(converger.layers_changed.wait(), wait)
            continue
        except TimeoutError:
            pass
        for overlay_id in daemon.layers.expired(time.monotonic()):
            log.info("minimesh: overlay %s expired", overlay_id)
            try:
                await daemon.remove_overlay(overlay_id)
            except ConfigError as exc:
                log.error("minimesh: removing overlay %s: %s", overlay_id, exc)


class Daemon:
    """The gateway, the sidecars and the admin API over one `Current[Snapshot]`, which the
    converge task alone swaps; the triggers here only record inputs and wake it."""

    def __init__(self, options: Options, first: Compiled, docker: Any = None) -> None:
        self.options = options
        self.current = Current(first.snapshot)
        self.config = ConfigState(first.sources, time.time())
        self.upstreams = Upstreams()
        self.metrics = Metrics()
        self.access_log = AccessLog()
        self.proxy = Proxy(self.current, self.upstreams, rng=random.Random(options.seed),
                           observers=(self.metrics, self.access_log), openers=(self.metrics.opened,),
                           debug_headers=options.debug_headers)  # fmt: skip
        self.serving = ListenerSet(self.proxy)
        self.capture = NetnsCapture(self.proxy) if options.capture == "netns" else None
        self.docker = docker
        self.supervisor = Supervisor()
        self.converger = Converger(self, first.files)
        self.ready = False
        self.started = False
        """Whether `run` got past the first discovery: only then is a converged pass `ready`, and
        only once its containers are captured (a request sent earlier could bypass the mesh)."""
        self.reloads_rejected = 0
        """Reloads of the files refused, the last good config serving on."""
        self._admin: web.AppRunner | None = None
        self._unwatch = asyncio.Event()
        self._watched = False
        self._discovery: DockerWatcher | None = None

    @property
    def internal_errors(self) -> int:
        """Exceptions minimesh did not expect (bugs), each logged with its traceback."""
        return self.supervisor.internal_errors

    @property
    def layers(self) -> Layers:
        """The applied documents and overlays in force."""
        return self.converger.good.layers

    def listeners(self) -> list[Listener]:
        captured = self.capture.servings() if self.capture else []
        return [s.listener for s in (*self.serving.servings(), *captured)]

    def stop(self) -> None:
        """Begin a clean stop (SIGTERM, SIGINT)."""
        self.supervisor.stopping.set()

    async def run(self) -> None:
        """Serve until `stop()`; DaemonError if a port cannot be listened on at start."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.set_exception_handler(self.supervisor.loop_error)
        supervise = self.supervisor.supervise
        try:
            configure_access_log(self.access_log, self.current.get())
            settle_heap()
            await self._listen()
            async with asyncio.TaskGroup() as tasks:
                jobs = [tasks.create_task(supervise("watch config files", self._watch), name="watch config files")]
                if self.docker is not None:
                    await self._first_discovery()
                    jobs.append(tasks.create_task(supervise("follow Docker events", self._follow_docker),
                                                  name="follow Docker events"))  # fmt: skip
                jobs.append(tasks.create_task(supervise("expire overlays", lambda: expire_overlays(self)),
                                              name="expire overlays"))  # fmt: skip
                await asyncio.sleep(0)  # the watcher registers with the OS before we say ready
                self.started = True
                self.ready = not self.serving.failed
                log.info("minimesh: ready; watching %s for changes", ", ".join(self.options.paths))
                await self.supervisor.stopping.wait()
                log.info("minimesh: stopping")
                self.ready = False
                self._unwatch.set()
                for task in jobs:
                    task.cancel()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            loop.set_exception_handler(None)
            await self._close()

    async def _listen(self) -> None:
        options = self.options
        await self.serving.start(self.current.get(), options.bind, options.gateway_port)
        self._admin = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self._admin.setup()
        site = web.TCPSite(self._admin, options.bind, options.admin_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise DaemonError(bind_problem(exc, options.bind, options.admin_port, "pass --admin-port")) from exc
        log.info("minimesh: admin API on http://%s:%d", options.bind, options.admin_port)

    async def _close(self) -> None:
        await self.converger.stop()
        await self.serving.close()
        if self.capture is not None:
            await self.capture.close()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.proxy.close()
        self.access_log.close()

    # ---- what a converge pass does with its result

    async def swap(self, compiled: Compiled, *, reloaded: bool) -> None:
        """Put the new snapshots in force, with the listeners that read them, in one loop step;
        the last reload's error stays shown until the files are `reloaded` without one."""
        for warning in compiled.warnings:
            log.warning("%s", warning)
        self.current.swap(compiled.snapshot)
        self.serving.retarget(compiled.snapshot)
        configure_access_log(self.access_log, compiled.snapshot)
        self.config = ConfigState(compiled.sources, time.time(), None if reloaded else self.config.error)

    async def reconcile(self, snapshot: Snapshot) -> None:
        """The sidecars and the captured containers, made what `snapshot` asks for."""
        await self.serving.reconcile(snapshot)
        if self.capture is not None:
            await self.capture.reconcile(snapshot.workloads)
        if self.started:
            self.ready = not self.serving.failed and not self.supervisor.stopping.is_set()

    # ---- triggers

    async def _watch(self) -> None:
        """Reload on each burst of changes to the files (and once more when it starts again
        after a failure: a change may have been missed meanwhile)."""
        if self._watched:
            self.converger.files_changed()
        self._watched = True
        folders, concerns = watch_filter(self.options.paths)
        changes = awatch(*folders, watch_filter=concerns, debounce=DEBOUNCE_MS, step=STEP_MS,
                         stop_event=self._unwatch, recursive=False)  # fmt: skip
        async for batch in changes:
            log.debug("minimesh: changed: %s", ", ".join(sorted(path for _, path in batch)))
            self.converger.files_changed()

    async def reload(self) -> None:
        """Read the files again and wait for the pass that does: swapped in, or refused and recorded."""
        self.converger.files_changed()
        await self.converger.settled()

    async def apply(self, text: str, source: str) -> int:
        """`minimesh apply`: these documents replace or join the applied layer; the new generation."""
        documents = await parse_documents(self.supervisor, text, source)
        generation = await self.converger.propose(with_applied(documents))
        log.info("minimesh: applied %s: generation %d", ", ".join(d.ref for d in documents), generation)
        return generation

    async def reset_applied(self) -> int:
        generation = await self.converger.propose(with_applied(None))
        log.info("minimesh: applied documents dropped: generation %d", generation)
        return generation

    async def add_overlay(self, text: str, ttl: float | None, scope: str | None) -> tuple[str, int]:
        """A test overlay over the files; its id and the generation it is live in."""
        documents = await parse_documents(self.supervisor, text, "overlay")
        expires = time.monotonic() + ttl if ttl else None
        overlay = Overlay(self.layers.next_id(), tuple(documents), expires, scope or None)
        generation = await self.converger.propose(with_overlay(overlay))
        log.info("minimesh: overlay %s (%s) live in generation %d", overlay.id, scope or "every request", generation)
        return overlay.id, generation

    async def remove_overlay(self, overlay_id: str) -> bool:
        if overlay_id not in self.layers.overlays:
            return False
        await self.converger.propose(with_overlay(removed=overlay_id))
        return True

    async def _first_discovery(self) -> None:
        """List the containers before saying ready, so the first requests find them."""
        discovery = self._discovery = DockerWatcher(self.docker, self._discovered, labels=self.options.docker_labels)
        discovery.records = await asyncio.to_thread(discovery.list_containers)
        discovered = discovery.discovered()
        for skipped in discovered.skipped:
            log.warning("minimesh: %s", skipped)
        self.converger.containers(discovered)
        await self.converger.settled()

    async def _follow_docker(self) -> None:
        """Follow Docker's events with the watcher that listed the containers; after a failure,
        with a new one, which lists them again."""
        discovery, self._discovery = self._discovery, None
        await (discovery or DockerWatcher(self.docker, self._discovered, labels=self.options.docker_labels)).run()

    def _discovered(self, discovered: Discovered) -> None:
        """The watcher's callback: the set of containers changed."""
        if discovered != self.converger.discovered and not self.supervisor.stopping.is_set():
            self.converger.containers(discovered)

    def __repr__(self) -> str:
        return (
            f"<Daemon generation={self.current.get().generation} sidecars={sorted(self.serving.sidecars)} "
            f"ready={self.ready} failed={sorted(self.serving.failed)}>"
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
