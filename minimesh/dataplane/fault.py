"""Fault injection: which of a route's faults fire for one request, and the fault step
that delays or aborts it as Envoy's fault filter does.

Percentages are drawn with the proxy's rng (seed it for repeatable runs). A VirtualService
annotated `minimesh.dev/fault-first: N` instead faults exactly the first N requests each of
its routes receives, whatever the percentages, and none after (DESIGN §1.4). Those counts
live here, by route ref, so they survive reloads; a change to the route's fault or to N
starts its count again.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from minimesh.config import model as m
from minimesh.dataplane.call import Call
from minimesh.dataplane.upstream import LocalReply
from minimesh.routing.snapshot import Forward, Route

FAULT_ABORT_BODY = b"fault filter abort"


def fires(rng: random.Random, percentage: float | None) -> bool:
    """Does a percentage-gated action fire? No percentage means never (Istio's default)."""
    if percentage is None:
        return False
    return percentage >= 100.0 or rng.random() * 100.0 < percentage


@dataclass(frozen=True, slots=True)
class Injection:
    """What one request gets: a delay (seconds) before anything else, and/or an abort status
    (with the gRPC status a gRPC request gets, when the abort names one)."""

    delay: float | None = None
    abort: int | None = None
    grpc_status: int | None = None


NO_INJECTION = Injection()


@dataclass(slots=True)
class _FirstCount:
    """How many requests a `fault-first` route has faulted, for one version of its fault."""

    basis: tuple[m.HTTPFaultInjection, int]
    served: int = 0


class Faults:
    """Decides the faults of each request; holds the `fault-first` counts."""

    __slots__ = ("_first", "rng")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._first: dict[str, _FirstCount] = {}

    def decide(self, route: Route) -> Injection:
        fault = route.fault
        if fault is None:
            return NO_INJECTION
        delay, abort = fault.delay, fault.abort
        if route.fault_first is not None:
            if not self._take(route.ref, fault, route.fault_first):
                return NO_INJECTION
        else:
            delay = delay if delay is not None and fires(self.rng, delay.percentage) else None
            abort = abort if abort is not None and fires(self.rng, abort.percentage) else None
            if delay is None and abort is None:
                return NO_INJECTION
        if abort is None:
            return Injection(delay.fixed_delay if delay is not None else None)
        return Injection(delay.fixed_delay if delay is not None else None, abort.http_status, abort.grpc_status)

    def _take(self, ref: str, fault: m.HTTPFaultInjection, first: int) -> bool:
        """Count one request of a `fault-first` route; True while it is among the first N."""
        count = self._first.get(ref)
        if count is None or count.basis != (fault, first):
            count = self._first[ref] = _FirstCount((fault, first))
        if count.served >= first:
            return False
        count.served += 1
        return True

    def __repr__(self) -> str:
        counts = " ".join(f"{ref}={c.served}/{c.basis[1]}" for ref, c in self._first.items())
        return f"<Faults fault-first {counts or 'none'}>"


async def fault_step(call: Call, faults: Faults, forward: Forward) -> bool:
    """Delay the request (`DI`) and/or answer it with the abort status (`FI`, True: done)."""
    injection = faults.decide(forward.route)
    if injection.delay is not None:
        call.exchange.flags.append("DI")
        await asyncio.sleep(injection.delay)
    if injection.abort is None:
        return False
    call.reply(LocalReply(injection.abort, FAULT_ABORT_BODY, "FI", grpc_status=injection.grpc_status))
    return True
