"""`RouteTest` documents: routing's unit tests, checked by `minimesh validate`.

Each test's request is decided against the snapshot, offline; what it got is compared
with what it expects, and a mismatch is reported at the test with the rule that decided.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from minimesh.config import model as m
from minimesh.errors import Problem
from minimesh.registry.model import Workload
from minimesh.routing.match import decide
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import (
    BlackHole,
    DirectResponse,
    Forward,
    NoRoute,
    Outcome,
    PassThrough,
    Redirect,
    Snapshot,
)

SEED = 7


@dataclass(frozen=True, slots=True)
class Got:
    """What a request got, in a RouteTest's terms."""

    host: str | None
    short: str | None
    subset: str | None
    port: int | None
    route: str
    status: int
    fault: str


def summarize(outcome: Outcome) -> Got:
    """The destination, status and fault a decision leads to, assuming a healthy upstream."""
    if isinstance(outcome, Forward):
        fault = outcome.fault
        abort = fault.abort if fault is not None else None
        delay = fault.delay if fault is not None else None
        aborted = abort is not None and (abort.percentage or 0.0) >= 100.0
        status = abort.http_status if aborted and abort is not None else 200
        kind = "abort" if aborted else "delay" if delay is not None and (delay.percentage or 0.0) >= 100 else "none"
        cluster = outcome.cluster
        return Got(cluster.host, cluster.short, cluster.subset, cluster.port, outcome.route_ref, status, kind)
    if isinstance(outcome, Redirect | DirectResponse):
        return Got(None, None, None, None, outcome.route_ref, outcome.status, "none")
    if isinstance(outcome, NoRoute):
        return Got(None, None, None, None, "", outcome.status, "none")
    if isinstance(outcome, BlackHole):
        return Got(outcome.host, outcome.host, None, outcome.port, "", outcome.status, "none")
    assert isinstance(outcome, PassThrough)
    return Got(outcome.host, outcome.host, None, outcome.port, "", 200, "none")


def mismatches(expect: m.TestExpectation, got: Got) -> list[str]:
    """Each expectation `got` does not meet, as `field: expected X, got Y`."""
    found: list[str] = []
    if expect.host is not None and expect.host not in (got.host, got.short):
        found.append(f"host: expected {expect.host}, got {got.short or 'no destination'}")
    if expect.subset is not None and expect.subset != got.subset:
        found.append(f"subset: expected {expect.subset}, got {got.subset or 'no subset'}")
    if expect.port is not None and expect.port != got.port:
        found.append(f"port: expected {expect.port}, got {got.port}")
    if expect.status is not None and expect.status != got.status:
        found.append(f"status: expected {expect.status}, got {got.status}")
    if expect.route is not None and expect.route != got.route:
        found.append(f"route: expected {expect.route}, got {got.route or 'no route'}")
    if expect.fault is not None and expect.fault != got.fault:
        found.append(f"fault: expected {expect.fault}, got {got.fault}")
    return found


def request_of(test: m.RouteTest) -> RequestView:
    spec = test.request
    source = None
    if spec.source_labels:
        source = Workload(name=f"{test.meta.name}-source", address="127.0.0.1", labels=spec.source_labels)
    gateway = spec.gateway or "mesh"
    if gateway != "mesh" and "/" not in gateway:
        gateway = f"{test.meta.namespace}/{gateway}"
    return RequestView.from_url(spec.method, spec.url, spec.headers, source=source, gateway=gateway)


def run_route_tests(snapshot: Snapshot) -> list[Problem]:
    """One error per failing RouteTest, at the test, naming the rule that decided."""
    problems: list[Problem] = []
    for test in snapshot.mesh.route_tests:
        outcome = decide(snapshot, request_of(test), random.Random(SEED))
        got = summarize(outcome)
        failed = mismatches(test.expect, got)
        if failed:
            decided = f"decided by {got.route}" if got.route else f"decided by no rule ({type(outcome).__name__})"
            message = f"route test failed: {'; '.join(failed)} ({decided})"
            problems.append(Problem(test.meta.location, "error", message, test.meta.ref, "expect"))
    return problems
