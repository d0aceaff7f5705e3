"""A streamed request body that retries and mirrors share, kept as Envoy's router keeps it:
forwarded as it arrives while a copy is recorded up to a bound; each attempt gets a `Body`
that replays the copy, then continues live. A body outgrowing the bound is no longer retried.
Each mirror gets its own `Body` fed alongside, whatever the size (Envoy's streaming shadow).
"""

from __future__ import annotations

import asyncio

from minimesh.dataplane.http1 import Body


class Replay:
    """One downstream body shared by a request's attempts and mirrors. A single pump reads it
    no faster than the current attempt's upstream takes it (that attempt's body is refilled
    only once empty) nor while a mirror holds `limit` bytes unread (as a shadow's watermarks
    pause Envoy's downstream), records each chunk while the copy fits `limit`, and feeds the
    current attempt and each mirror. `overflowed`: the copy outgrew `limit` and was dropped,
    so nothing can be sent again."""

    __slots__ = (
        "_chunks", "_done", "_error", "_limit", "_loop", "_pump", "_recording", "_size", "_source",
        "_target", "_tees", "_waiter", "overflowed",
    )  # fmt: skip

    def __init__(self, source: Body, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._limit = limit
        self._loop = loop
        self._chunks: list[bytes] = []
        self._size = 0
        self._recording = True
        self._done = False
        self._error: BaseException | None = None
        self._target: Body | None = None
        self._pump: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._tees: list[Body] = []
        self.overflowed = False

    def body(self) -> Body:
        """The body of the next attempt: the copy so far, then the rest as it arrives (the
        previous attempt's body gets no more)."""
        target = Body(self._wake, self._loop)
        for chunk in self._chunks:
            target.feed(chunk)
        if self._done:
            if self._error is not None:
                target.fail(self._error)
            else:
                target.finish()
        self._target = target
        if self._pump is None and not self._done:
            self._pump = self._loop.create_task(self._run())
        else:
            self._wake()
        return target

    def tee(self) -> Body:
        """A mirror's own copy of the body, made before the pump starts: every chunk, as it
        arrives. Its reader gives it up with `untee`."""
        copy = Body(self._wake, self._loop)
        self._tees.append(copy)
        return copy

    def untee(self, copy: Body) -> None:
        """A mirror is done with its copy (answered, or failed): it is fed no more and never
        holds the body up."""
        if copy in self._tees:
            self._tees.remove(copy)
            self._wake()

    def settle(self) -> None:
        """The response is passed on, so no attempt follows: the copy is dropped."""
        self._stop_recording()

    def close(self) -> None:
        """The request is over: the pump stops. A mirror's copy not yet whole gets the rest
        of the body when the client has sent it all (Envoy's shadows take the body as it
        comes in, whatever the upstream's pace); otherwise it fails, as Envoy cancels the
        shadows of a stream that ends first."""
        pump = self._pump
        if pump is not None and not pump.done():
            pump.cancel()
        source = self._source
        rest = source.take() if self._tees and source.complete and source.error is None else None
        for copy in self._tees:
            if copy.complete:
                continue
            if rest is None:
                copy.fail(ConnectionResetError("the request ended before its body"))
                continue
            if rest:
                copy.feed(rest)
            copy.finish()
        self._tees = []

    async def _run(self) -> None:
        source = self._source
        try:
            while True:
                while (self._target is not None and self._target.buffered) or self._tee_full():
                    await self._wait()
                chunk = await source.read()
                if not chunk:
                    break
                self._record(chunk)
                if self._target is not None:
                    self._target.feed(chunk)
                for copy in self._tees:
                    copy.feed(chunk)
        except Exception as error:  # the downstream failed (its client left): so do the others
            self._done = True
            self._error = error
            for body in (self._target, *self._tees):
                if body is not None:
                    body.fail(error)
            return
        self._done = True
        for body in (self._target, *self._tees):
            if body is not None:
                body.finish()

    def _tee_full(self) -> bool:
        limit = self._limit
        return bool(self._tees) and any(copy.buffered >= limit for copy in self._tees)

    def _record(self, chunk: bytes) -> None:
        if not self._recording:
            return
        if self._size + len(chunk) > self._limit:
            self.overflowed = True
            self._stop_recording()
            return
        self._chunks.append(chunk)
        self._size += len(chunk)

    def _stop_recording(self) -> None:
        self._recording = False
        self._chunks = []
        self._size = 0

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        state = "overflowed" if self.overflowed else "done" if self._done else "streaming"
        return f"<Replay {state} recorded={self._size}>"
