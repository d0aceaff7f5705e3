"""Time a test controls. `FakeClock` moves only when the test says (for code handed a clock,
such as outlier ejections); `VirtualTimeLoop` is an asyncio loop on virtual time, for timers
(deadlines, header and idle timeouts): it stands still while anything can run and jumps to the
next timer when nothing can, so a 300 s timeout takes no time and never races the machine."""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Jumping(selectors.DefaultSelector):
    """Polls without waiting; when nothing is ready, moves the clock on by the wait asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("nothing can run and no timer is due: the test would wait forever")
        self.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """`time()` is virtual: it starts at 0 and moves only when every task is waiting."""

    def __init__(self) -> None:
        self._jumping = _Jumping()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def on_virtual_time(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh `VirtualTimeLoop` (a plain test function to pytest, which
    still sees the test's parameters); tasks it leaves waiting are cancelled at its end."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        loop = VirtualTimeLoop()
        try:
            loop.run_until_complete(test(*args, **kwargs))
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()

    return run


async def settle() -> None:
    """Let everything that can run, run: on virtual time a sleep ends only once nothing else
    can, and a millisecond fires no timer a test sets."""
    await asyncio.sleep(0.001)
