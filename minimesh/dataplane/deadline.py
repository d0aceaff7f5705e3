"""`Deadline`: `asyncio.timeout` for the request path (route and per-try timeouts)."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

ENTERED, EXPIRING, EXPIRED, EXITED = range(4)


class Deadline:
    """`asyncio.timeout(delay)` for the request path, with the same semantics (when due, cancel
    the task; out of the block that cancellation comes as TimeoutError), but handed the loop
    rather than asking for it and for the task: on Python 3.11 each ask is a `getpid()`."""

    __slots__ = ("_cancelling", "_handle", "_loop", "_state", "_task", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self.when = loop.time() + delay
        self._state = ENTERED
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.Handle | None = None
        self._cancelling = 0

    def expired(self) -> bool:
        return self._state in (EXPIRING, EXPIRED)

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("a Deadline works inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = self._loop
        if self.when <= loop.time():
            self._handle = loop.call_soon(self._expire)
        else:
            self._handle = loop.call_at(self.when, self._expire)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._state == EXPIRING:
            self._state = EXPIRED
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from error
        elif self._state == ENTERED:
            self._state = EXITED

    def _expire(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self._state = EXPIRING
        self._handle = None

    def __repr__(self) -> str:
        state = ("entered", "expiring", "expired", "exited")[self._state]
        return f"<Deadline when={self.when:.3f} {state}>"
