"""The converge task: the one task that turns recorded inputs into the snapshots in force.
Triggers record what changed and wake it; a pass takes everything recorded so far (a burst is one
compile), compiles the default and every scoped snapshot together and swaps them as one. A pass
that fails is tried again source by source (the files, then each proposal), so each source keeps
its last good version and each error goes to the source it came from."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from minimesh.daemon.inputs import Inputs, Proposal
from minimesh.daemon.pipeline import Ask, Compiled, Files, compiled, read_files, run_pipeline
from minimesh.errors import ConfigError
from minimesh.overlays import Layers
from minimesh.registry.watch import Discovered

if TYPE_CHECKING:
    from minimesh.daemon.runtime import Daemon

log = logging.getLogger("minimesh")


def compile_all(inputs: Inputs, generation: int) -> Compiled:
    """The pipeline for `inputs`: the default snapshot and one per overlay scope, together."""
    layers = inputs.layers
    ask = Ask(layers=tuple(layers.layers()), workloads=inputs.discovered.workloads, generation=generation)
    found = compiled(run_pipeline(inputs.files, ask))
    scoped = {
        scope: compiled(run_pipeline(inputs.files, replace(ask, layers=tuple(layers.layers(scope))))).snapshot
        for scope in sorted(layers.scopes())
    }
    return replace(found, snapshot=replace(found.snapshot, scoped=scoped))


class Converger:
    """The converge task and what the triggers record for it. It runs while there is something
    recorded and not yet compiled; each pass's failure is a bug logged and counted by the
    daemon's supervisor, and whoever awaits a proposal gets its outcome, even at a stop."""

    def __init__(self, daemon: Daemon, files: Files) -> None:
        self.daemon = daemon
        self.good = Inputs(files)
        """The inputs of the snapshots in force."""
        self.changes = 0
        """File changes seen; `read` is how many the last read of the files covered."""
        self.read = 0
        self.discovered = Discovered()
        """The newest containers; `taken` is what the last pass took of them."""
        self.taken = Discovered()
        self.proposals: deque[Proposal] = deque()
        self.compiles = 0
        """Compiles run, each of the default and every scoped snapshot: a burst of triggers is one."""
        self.layers_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="converge")
            self._task.add_done_callback(self._ended)

    def files_changed(self) -> None:
        self.changes += 1
        self.wake()

    def containers(self, discovered: Discovered) -> None:
        self.discovered = discovered
        self.wake()

    async def settled(self) -> None:
        """Wait until the passes for the inputs recorded so far are done."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def propose(self, change: Callable[[Layers], Layers]) -> int:
        """The generation a change of layers is live in; ConfigError if it is refused."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.proposals.append(Proposal(change, done))
        self.wake()
        return await done

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _ended(self, _: asyncio.Task[None]) -> None:
        """The task ended: drained, or cancelled at a stop, when a proposal left is cancelled."""
        while self.proposals:
            self.proposals.popleft().done.cancel()

    async def _drain(self) -> None:
        while self.proposals or self.changes != self.read or self.discovered != self.taken:
            proposals = tuple(self.proposals)
            self.proposals.clear()
            try:
                await self._pass(proposals)
            except Exception as exc:
                self.daemon.supervisor.bug("in the background task 'converge'")
                for proposal in proposals:
                    if not proposal.done.done():
                        proposal.done.set_exception(exc)
            finally:
                for proposal in proposals:
                    proposal.done.cancel()

    async def _pass(self, proposals: tuple[Proposal, ...]) -> None:
        """Everything recorded, compiled as one; if that fails and more than one source changed,
        each on its own: the files and containers (committed: they are what is running), then
        each proposal."""
        files = await self._read() if self.changes != self.read else None
        self.taken = self.discovered
        committed = files is not None or self.taken != self.good.discovered
        if not committed and not proposals:
            return
        alone = committed + len(proposals) <= 1
        if await self._attempt(files, proposals, report=alone) or alone:
            return
        if committed:
            await self._attempt(files, (), report=True)
        for proposal in proposals:
            await self._attempt(None, (proposal,), report=True)

    async def _read(self) -> Files | None:
        """The files read again, off the loop; None (the reload refused) if minimesh failed on them."""
        self.read = self.changes
        paths = self.daemon.options.paths
        try:
            return await self.daemon.supervisor.off_loop(paths[0], read_files, paths)
        except ConfigError as exc:
            self._refused(exc)
            return None

    async def _attempt(self, files: Files | None, proposals: tuple[Proposal, ...], *, report: bool) -> bool:
        """Compile the inputs in force with `files`, `proposals` and the newest containers; swap
        them in and answer the proposals. On a ConfigError, keep the last good set, and when
        `report`, refuse each source with it."""
        daemon, good = self.daemon, self.good
        layers = good.layers
        for proposal in proposals:
            layers = proposal.change(layers)
        inputs = Inputs(good.files if files is None else files, layers, self.taken)
        generation = daemon.current.get().generation + 1
        began = time.monotonic()
        self.compiles += 1
        try:
            found = await daemon.supervisor.off_loop(daemon.options.paths[0], compile_all, inputs, generation)
        except ConfigError as exc:
            if report:
                self._refuse(exc, files is not None, proposals)
            return False
        self.good = inputs
        await daemon.swap(
            found if files is not None or proposals else replace(found, warnings=()), reloaded=files is not None
        )
        if files is not None:
            log.info("minimesh: reloaded: generation %d live in %.0f ms", generation, (time.monotonic() - began) * 1000)
        if inputs.discovered != good.discovered:
            names = ", ".join(w.name for w in inputs.discovered.workloads) or "none"
            log.info("minimesh: containers changed: generation %d, containers: %s", generation, names)
        for proposal in proposals:
            proposal.done.set_result(generation)
        if proposals:
            self.layers_changed.set()
        await daemon.reconcile(found.snapshot)
        return True

    def _refuse(self, exc: ConfigError, files: bool, proposals: tuple[Proposal, ...]) -> None:
        """A failed compile, reported to the one source it tried to change."""
        for proposal in proposals:
            proposal.done.set_exception(exc)
        if files or not proposals:
            self._refused(exc, "reload" if files else "recompile for the containers")

    def _refused(self, exc: ConfigError, what: str = "reload") -> None:
        """A reload of the files (or a recompile for new containers, which fails only on a bug)
        refused: logged; a reload is counted and its error shown until the files load again."""
        daemon = self.daemon
        lines = tuple(str(p) for p in exc.problems)
        for line in lines:
            log.error("%s", line)
        kept = daemon.current.get().generation
        log.error("minimesh: %s refused (%d errors); still serving generation %d", what, len(lines), kept)
        if what == "reload":
            daemon.reloads_rejected += 1
            daemon.config = replace(daemon.config, error=lines)
