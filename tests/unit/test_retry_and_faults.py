"""The two pure deciders of the router: which results a retry policy retries (each Envoy
`retry_on` condition as Istio programs it), and which faults a request gets (percentages on
a seeded rng, and `fault-first` counts per route that survive a reload)."""

from __future__ import annotations

import random

import pytest

from minimesh.config import model as m
from minimesh.dataplane.fault import NO_INJECTION, Faults, Injection
from minimesh.routing.retry import NO_RETRY, RetryDecider, RetryPolicy
from minimesh.routing.snapshot import Route

# ---------------------------------------------------------------- retries

DEFAULT_ON = ",".join(m.DEFAULT_RETRY_ON)
STATUSES = (200, 404, 409, 418, 500, 501, 502, 503, 504)
FAILURES = {"UF": ("UF", False), "UC": ("UC", False), "UT": ("UT", False), "UR": ("UR", False),
            "refused": ("UR", True)}  # fmt: skip
"""Each local failure as `retries_failure` is asked about it: a connect failure, a connection
lost, a per-try timeout, a stream reset by an HTTP/2 upstream, and a stream it refused."""
ANY = {"UF", "UC", "UT", "UR", "refused"}

RETRY_ON = {
    "5xx": ("5xx", (), {500, 501, 502, 503, 504}, ANY),
    "gateway-error": ("gateway-error", (), {502, 503, 504}, ANY),
    "reset": ("reset", (), set(), ANY),
    "connect-failure": ("connect-failure", (), set(), {"UF"}),
    "retriable-4xx": ("retriable-4xx", (), {409}, set()),
    "retriable-status-codes": ("retriable-status-codes", (418, 501), {418, 501}, set()),
    "codes without retriable-status-codes": ("reset", (418,), set(), ANY),
    "refused-stream alone (HTTP/2 only)": ("refused-stream", (), set(), {"refused"}),
    "Istio's default": ("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", (503,),
                        {503}, {"UF", "refused"}),
    "several": ("gateway-error,retriable-4xx", (), {409, 502, 503, 504}, ANY),
}  # fmt: skip


def retried_failures(decider: RetryDecider) -> set[str]:
    return {name for name, (flag, refused) in FAILURES.items() if decider.retries_failure(flag, refused=refused)}


@pytest.mark.parametrize(("on", "codes", "statuses", "failures"), RETRY_ON.values(), ids=RETRY_ON.keys())
def test_each_retry_on_condition_retries_its_statuses_and_failures(
    on: str, codes: tuple[int, ...], statuses: set[int], failures: set[str]
) -> None:
    decider = RetryDecider.of(RetryPolicy(2, tuple(on.split(",")), codes, 0.5))
    assert {s for s in STATUSES if decider.retries_response(s, [])} == statuses
    assert retried_failures(decider) == failures
    assert (decider.attempts, decider.per_try_timeout) == (2, 0.5)


GRPC_RETRY_ON = {
    "cancelled": {1},
    "deadline-exceeded": {4},
    "internal": {13},
    "resource-exhausted": {8},
    "unavailable": {14},
    "5xx,unavailable": {14},
    "Istio's default": {1, 14},
    "5xx": set(),
}


@pytest.mark.parametrize("on", GRPC_RETRY_ON)
def test_grpc_conditions_retry_the_grpc_status_of_the_response_headers(on: str) -> None:
    conditions = DEFAULT_ON if on == "Istio's default" else on
    decider = RetryDecider.of(RetryPolicy(2, tuple(conditions.split(","))))
    retried = {code for code in range(17) if decider.retries_response(200, [(b"grpc-status", b"%d" % code)])}
    assert retried == GRPC_RETRY_ON[on]


def test_a_grpc_status_counts_whatever_the_http_status_and_only_as_a_number() -> None:
    decider = RetryDecider.of(RetryPolicy(1, ("unavailable",)))
    head = [(b"content-type", b"application/grpc"), (b"grpc-status", b"14"), (b"grpc-message", b"down")]
    assert decider.retries_response(200, head)
    assert decider.retries_response(404, [(b"grpc-status", b"14")])
    assert not decider.retries_response(200, [(b"content-type", b"application/grpc")])
    assert not decider.retries_response(200, [(b"grpc-status", b"x14")])
    assert not decider.retries_response(200, [(b"grpc-message", b"14")])
    assert not decider.retries_response(503, [])


@pytest.mark.parametrize("policy", [None, RetryPolicy(0, ("5xx",)), RetryPolicy(-1, ("5xx",))])
def test_no_policy_or_no_attempts_is_no_retry(policy: RetryPolicy | None) -> None:
    decider = RetryDecider.of(policy)
    assert decider is NO_RETRY
    assert not any(decider.retries_response(s, []) for s in STATUSES)
    assert retried_failures(decider) == set()


# ---------------------------------------------------------------- faults


def route(fault: m.HTTPFaultInjection | None, ref: str = "VirtualService/default/web#http[0]",
          first: int | None = None) -> Route:  # fmt: skip
    return Route(ref, "", None, (), fault=fault, fault_first=first)


def fault(delay: float | None = None, abort: float | None = None) -> m.HTTPFaultInjection:
    """A 2 s delay and a 503 abort, each at its percentage (None: the field set without one)."""
    return m.HTTPFaultInjection(m.Delay(2.0, delay), m.Abort(503, abort))


def test_a_route_without_a_fault_gets_none() -> None:
    assert Faults(random.Random(1)).decide(route(None)) is NO_INJECTION


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (fault(100, 100), Injection(2.0, 503)),
        (fault(100, None), Injection(2.0, None)),
        (fault(None, 100), Injection(None, 503)),
        (fault(None, None), NO_INJECTION),
        (fault(0, 0), NO_INJECTION),
        (m.HTTPFaultInjection(abort=m.Abort(418, 100)), Injection(None, 418)),
        (m.HTTPFaultInjection(abort=m.Abort(200, 100, 14)), Injection(None, 200, 14)),
    ],
    ids=["both", "delay", "abort", "no percentage is never (Istio's default)", "zero", "abort only", "grpcStatus"],
)
def test_certain_faults_always_or_never_fire(given: m.HTTPFaultInjection, expected: Injection) -> None:
    faults = Faults(random.Random(1))
    assert {faults.decide(route(given)) for _ in range(200)} == {expected}


@pytest.mark.parametrize(("delay", "abort"), [(25.0, 50.0), (10.0, 90.0), (0.5, 99.5)])
def test_percentages_hit_their_share_independently_and_repeat_with_the_seed(delay: float, abort: float) -> None:
    given = route(fault(delay, abort))
    faults = Faults(random.Random(11))
    drawn = [faults.decide(given) for _ in range(20_000)]
    share = {
        "delay": sum(i.delay is not None for i in drawn) / len(drawn),
        "abort": sum(i.abort is not None for i in drawn) / len(drawn),
        "both": sum(i.delay is not None and i.abort is not None for i in drawn) / len(drawn),
    }
    assert share["delay"] == pytest.approx(delay / 100, abs=0.015)
    assert share["abort"] == pytest.approx(abort / 100, abs=0.015)
    assert share["both"] == pytest.approx(delay * abort / 10_000, abs=0.015)
    first, second = Faults(random.Random(7)), Faults(random.Random(7))
    assert [first.decide(given) for _ in range(500)] == [second.decide(given) for _ in range(500)]


def test_fault_first_faults_exactly_the_first_n_whatever_the_percentages() -> None:
    faults = Faults(random.Random(1))
    given = route(fault(None, None), first=3)
    assert [faults.decide(given) for _ in range(6)] == [Injection(2.0, 503)] * 3 + [NO_INJECTION] * 3


def test_fault_first_counts_per_route_and_survive_a_reload_that_keeps_the_fault() -> None:
    faults = Faults(random.Random(1))
    web, other = route(fault(), first=2), route(fault(), ref="VirtualService/default/other#http[0]", first=1)
    assert faults.decide(web) != NO_INJECTION
    assert [faults.decide(other) != NO_INJECTION for _ in range(2)] == [True, False]
    reloaded = route(fault(), first=2)
    assert reloaded is not web
    assert [faults.decide(reloaded) != NO_INJECTION for _ in range(2)] == [True, False]


@pytest.mark.parametrize(
    "changed", [route(fault(), first=3), route(fault(abort=50), first=2)], ids=["another N", "another fault"]
)
def test_fault_first_starts_again_when_its_fault_or_n_changes(changed: Route) -> None:
    faults = Faults(random.Random(1))
    for _ in range(5):
        faults.decide(route(fault(), first=2))
    assert faults.decide(changed) != NO_INJECTION
