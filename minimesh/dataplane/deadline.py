"""`Deadline`: `asyncio.timeout` for the request path (route and per-try timeouts); and
`Expected`, the time each upstream request is told it has within them."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from minimesh.dataplane.grpc import GRPC_TIMEOUT, format_grpc_timeout
from minimesh.routing.headers import HeaderList

ENTERED, EXPIRING, EXPIRED, EXITED = range(4)
EXPECTED_TIMEOUT = b"x-envoy-expected-rq-timeout-ms"


class Deadline:
    """`asyncio.timeout(delay)` for the request path, with the same semantics (when due, cancel
    the task; out of the block that cancellation comes as TimeoutError), but handed the loop
    rather than asking for it and for the task: on Python 3.11 each ask is a `getpid()`."""

    __slots__ = ("_cancelling", "_handle", "_loop", "_state", "_task", "started", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self.started = loop.time()
        self.when = self.started + delay
        self._state = ENTERED
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.Handle | None = None
        self._cancelling = 0

    def expired(self) -> bool:
        return self._state in (EXPIRING, EXPIRED)

    def elapsed_ms(self) -> int:
        """Whole milliseconds since the deadline was set (Envoy's router counts a retry's in
        whole milliseconds too, from the end of the request rather than its head)."""
        return int((self._loop.time() - self.started) * 1000)

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


class Expected:
    """The time an upstream request is told it has, as Envoy's router tells it on each try
    (`setTimeoutHeaders`; Istio leaves Envoy's headers on): the per-try timeout when shorter
    than the route's, else the route's, never more than what is left of the route's, in
    `x-envoy-expected-rq-timeout-ms`, and in `grpc-timeout` too on a gRPC request (Istio
    gives its routes `max_grpc_timeout`). Made per request with a timeout, so a plain class."""

    __slots__ = ("grpc", "per_try_ms", "timeout_ms")

    def __init__(self, timeout_ms: int, per_try_ms: int, grpc: bool) -> None:
        self.timeout_ms = timeout_ms
        self.per_try_ms = per_try_ms
        self.grpc = grpc

    @classmethod
    def of(cls, timeout: float | None, per_try_timeout: float | None, grpc: bool) -> Expected | None:
        """The route's timeout and per-try timeout in whole milliseconds; None when neither
        is set, and the request goes on with the headers it came with."""
        timeout_ms = round(timeout * 1000) if timeout else 0
        per_try_ms = round(per_try_timeout * 1000) if per_try_timeout else 0
        return cls(timeout_ms, per_try_ms, grpc) if timeout_ms or per_try_ms else None

    @property
    def names(self) -> tuple[bytes, ...]:
        """The request headers it replaces."""
        return (EXPECTED_TIMEOUT, GRPC_TIMEOUT) if self.grpc else (EXPECTED_TIMEOUT,)

    def ms(self, elapsed_ms: int) -> int:
        """What a try sent `elapsed_ms` into the route's timeout is told (1 once none is left:
        0 would mean no timeout). A per-try timeout no shorter than the route's comes to the
        route's, as Envoy's `finalTimeout` makes it."""
        expected = self.per_try_ms or self.timeout_ms
        if self.timeout_ms:
            expected = 1 if elapsed_ms >= self.timeout_ms else min(expected, self.timeout_ms - elapsed_ms)
        return expected

    def fields(self, elapsed_ms: int) -> HeaderList:
        ms = self.ms(elapsed_ms)
        fields = [(EXPECTED_TIMEOUT, b"%d" % ms)]
        if self.grpc:
            fields.append((GRPC_TIMEOUT, format_grpc_timeout(ms)))
        return fields

    def lines(self, elapsed_ms: int) -> bytes:
        """`fields` as HTTP/1.1 header lines."""
        return b"".join(b"%s: %s\r\n" % field for field in self.fields(elapsed_ms))
