"""A cluster's run-time state on its own: circuit-breaker counts (`http2MaxRequests`,
`maxRetries`), outlier detection (streaks, ejection within `maxEjectionPercent` but always
one, ejections that end on a fake clock and grow with each one; `can_pick` as `pick` has it),
the load balancer kept across a reload that leaves the cluster as it was, and the HTTP/1.1 keep-alive pool
(`KeepAlive`: reuse, `maxConnections`, the pending queue and its overflow, slots handed over,
`maxRequestsPerConnection`) over socket pairs, so nothing leaves the process."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
from collections.abc import Iterator

import pytest

from minimesh.config import model as m
from minimesh.dataplane.http1 import UpstreamConnection
from minimesh.dataplane.upstream import MAX_EJECTION_TIME, OVERFLOW, ClusterState, UpstreamFailure
from minimesh.routing.snapshot import UNLIMITED, Cluster, Endpoint, Policy
from tests.clocks import FakeClock, on_virtual_time, settle


def endpoints(count: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(None, f"10.0.0.{number}", 9080) for number in range(1, count + 1))


def cluster(
    count: int = 3,
    *,
    outlier: m.OutlierDetection | None = None,
    pool: m.ConnectionPool = UNLIMITED,
    balance: str = "ROUND_ROBIN",
) -> Cluster:
    policy = Policy(m.LoadBalancer(simple=balance), pool, outlier)
    return Cluster("outbound|9080||web.default.svc.cluster.local", "web.default.svc.cluster.local", "web",
                   "default", None, 9080, endpoints(count), policy)  # fmt: skip


# ---------------------------------------------------------------- circuit breaking


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_http2_max_requests_admits_that_many_in_flight(limit: int) -> None:
    state = ClusterState("c")
    pool = m.ConnectionPool(http2_max_requests=limit)
    for _ in range(limit):
        state.admit(pool)
    with pytest.raises(UpstreamFailure) as refused:
        state.admit(pool)
    assert refused.value.reply is OVERFLOW
    assert (state.requests, state.overflows) == (limit, 1)
    state.done()
    state.admit(pool)
    assert (state.requests, state.overflows) == (limit, 1)


def test_without_a_limit_requests_are_only_counted() -> None:
    state = ClusterState("c")
    for _ in range(1000):
        state.admit(m.ConnectionPool())
    for _ in range(1000):
        state.done()
    assert (state.requests, state.overflows) == (0, 0)


@pytest.mark.parametrize(("limit", "admitted"), [(1, 1), (3, 3), (None, 10)])
def test_max_retries_bounds_retries_outstanding(limit: int | None, admitted: int) -> None:
    state = ClusterState("c")
    pool = m.ConnectionPool(max_retries=limit)
    answers = [state.admit_retry(pool) for _ in range(10)]
    assert answers == [True] * admitted + [False] * (10 - admitted)
    assert (state.retries, state.overflows) == (admitted, 10 - admitted)
    state.retry_done()
    assert state.admit_retry(pool)


# ---------------------------------------------------------------- outlier detection

STREAKS = {
    "five 5xx in a row": (m.OutlierDetection(consecutive_5xx_errors=5), [500] * 5, True),
    "one short": (m.OutlierDetection(consecutive_5xx_errors=5), [500] * 4, False),
    "a success resets the streak": (m.OutlierDetection(consecutive_5xx_errors=3), [500, 500, 200, 500, 500], False),
    "a 4xx is a success": (m.OutlierDetection(consecutive_5xx_errors=2), [500, 404, 500], False),
    "gateway errors only 502 503 504": (
        m.OutlierDetection(consecutive_gateway_errors=2, consecutive_5xx_errors=0),
        [502, 500, 503, 500, 504],
        False,
    ),
    "two gateway errors in a row": (
        m.OutlierDetection(consecutive_gateway_errors=2, consecutive_5xx_errors=0),
        [500, 503, 504],
        True,
    ),
    "a gateway error counts as a 5xx too": (
        m.OutlierDetection(consecutive_gateway_errors=9, consecutive_5xx_errors=3),
        [502, 503, 500],
        True,
    ),
    "no threshold never ejects": (m.OutlierDetection(), [500] * 50, False),
}


@pytest.mark.parametrize(("detection", "statuses", "ejected"), STREAKS.values(), ids=STREAKS.keys())
def test_a_streak_of_errors_ejects(detection: m.OutlierDetection, statuses: list[int], ejected: bool) -> None:
    web = cluster(3, outlier=detection)
    state = ClusterState("c", FakeClock())
    for status in statuses:
        state.record(web, web.endpoints[0], status)
    assert (web.endpoints[0] in state.ejected(web)) == ejected
    host = state.host(web.endpoints[0])
    assert (host.failures, host.successes) == (sum(s >= 500 for s in statuses), sum(s < 500 for s in statuses))


def test_can_pick_says_whether_pick_has_an_endpoint_for_a_first_try() -> None:
    everyone_out = m.OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100)
    rng = random.Random(7)
    cases = []
    for web, failing, original in [
        (cluster(0), 0, None),
        (cluster(2, outlier=everyone_out), 2, None),
        (cluster(2, outlier=everyone_out), 1, None),
        (dataclasses.replace(cluster(0), original_destination=True), 0, ("10.0.0.9", 80)),
        (dataclasses.replace(cluster(0), original_destination=True), 0, None),
    ]:
        state = ClusterState("c", FakeClock())
        for endpoint in web.endpoints[:failing]:
            state.record(web, endpoint, 500)
        can = state.can_pick(web, original)
        assert can == (state.pick(web, rng, None, (), original) is not None)
        cases.append(can)
    assert cases == [False, False, True, True, False]


def test_without_outlier_detection_nothing_is_ejected_but_results_are_counted() -> None:
    web = cluster(2)
    state = ClusterState("c", FakeClock())
    for _ in range(20):
        state.record(web, web.endpoints[0], 503)
    assert state.ejected(web) == frozenset()
    assert state.host(web.endpoints[0]).failures == 20


EJECTION_CAPS = {
    "half of four": (4, 50, 2),
    "always at least one, even past the percentage": (3, 10, 1),
    "the only endpoint": (1, 10, 1),
    "every one at 100%": (5, 100, 5),
    "a third of ten at 35%": (10, 35, 3),
}


@pytest.mark.parametrize(("count", "percent", "ejected"), EJECTION_CAPS.values(), ids=EJECTION_CAPS.keys())
def test_max_ejection_percent_caps_the_ejected_share(count: int, percent: int, ejected: int) -> None:
    web = cluster(count, outlier=m.OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=percent))
    state = ClusterState("c", FakeClock())
    for endpoint in web.endpoints:
        state.record(web, endpoint, 500)
    assert state.ejected(web) == set(web.endpoints[:ejected]), "the first to fail are out, the rest refused"


def test_a_refused_ejection_starts_the_streak_over() -> None:
    web = cluster(3, outlier=m.OutlierDetection(consecutive_5xx_errors=2, max_ejection_percent=10))
    state = ClusterState("c", FakeClock())
    first, second = web.endpoints[:2]
    for _ in range(2):
        state.record(web, first, 500)
    for _ in range(2):
        state.record(web, second, 500)
    assert state.ejected(web) == {first}
    assert state.host(second).consecutive_5xx == 0, "the streak that tripped is spent"
    state.record(web, second, 500)
    assert state.host(second).consecutive_5xx == 1


def test_an_ejection_ends_after_base_time_times_the_ejections() -> None:
    clock = FakeClock()
    web = cluster(2, outlier=m.OutlierDetection(consecutive_5xx_errors=1, base_ejection_time=30))
    state = ClusterState("c", clock)
    bad = web.endpoints[0]
    for number in (1, 2, 3):
        state.record(web, bad, 503)
        assert state.host(bad).times_ejected == number
        clock.advance(30 * number - 0.001)
        assert state.ejected(web) == {bad}
        clock.advance(0.001)
        assert state.ejected(web) == frozenset()
        assert state.host(bad).consecutive_5xx == 0


def test_an_ejection_never_lasts_longer_than_the_maximum() -> None:
    clock = FakeClock()
    web = cluster(2, outlier=m.OutlierDetection(consecutive_5xx_errors=1, base_ejection_time=100))
    state = ClusterState("c", clock)
    bad = web.endpoints[0]
    for _ in range(4):
        state.record(web, bad, 500)
        clock.advance(MAX_EJECTION_TIME)
        assert state.ejected(web) == frozenset()
    state.record(web, bad, 500)
    assert state.host(bad).ejected_until == clock.now + MAX_EJECTION_TIME


def test_an_ejected_endpoint_is_not_ejected_again_while_out() -> None:
    clock = FakeClock()
    web = cluster(2, outlier=m.OutlierDetection(consecutive_5xx_errors=1, base_ejection_time=10))
    state = ClusterState("c", clock)
    for _ in range(5):
        state.record(web, web.endpoints[0], 500)
    assert state.host(web.endpoints[0]).times_ejected == 1
    clock.advance(10)
    assert state.ejected(web) == frozenset()


# ---------------------------------------------------------------- the balancer across reloads


def test_the_balancer_is_kept_for_the_same_cluster_and_for_an_identical_one() -> None:
    state = ClusterState("c")
    rng = random.Random(3)
    web = cluster(3)
    balancer = state.balancer(web, rng)
    picks = [balancer.pick() for _ in range(2)]
    assert state.balancer(web, rng) is balancer
    recompiled = cluster(3)
    assert recompiled is not web and recompiled == web
    assert state.balancer(recompiled, rng) is balancer, "a reload that changes nothing keeps the round-robin place"
    picks.append(balancer.pick())
    assert sorted(picks, key=str) == list(web.endpoints)


@pytest.mark.parametrize(
    "changed",
    [cluster(4), cluster(3, balance="RANDOM"), cluster(3, pool=m.ConnectionPool(max_connections=1))],
    ids=["endpoints", "load balancer", "connection pool"],
)
def test_a_changed_cluster_gets_a_new_balancer(changed: Cluster) -> None:
    state = ClusterState("c")
    rng = random.Random(3)
    balancer = state.balancer(cluster(3), rng)
    assert state.balancer(changed, rng) is not balancer


# ---------------------------------------------------------------- the HTTP/1.1 keep-alive pool


class Peers:
    """The upstream ends of the pool's connections, in the order they were dialled."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    async def dial(self, address: str, port: int) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        self.sockets.append(theirs)
        return ours

    def close(self) -> None:
        for peer in self.sockets:
            peer.close()


@pytest.fixture
def peers() -> Iterator[Peers]:
    made = Peers()
    yield made
    made.close()


async def exchange(conn: UpstreamConnection, peer: socket.socket) -> None:
    """One request on `conn` that `peer` answers (200, no body, kept alive): at its end the
    connection goes back to its pool."""
    loop = asyncio.get_running_loop()

    async def answer() -> None:
        await loop.sock_recv(peer, 65536)
        await loop.sock_sendall(peer, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    await asyncio.gather(conn.exchange(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n", b""), answer())


@on_virtual_time
async def test_a_finished_exchange_leaves_its_connection_idle_for_the_next_request(peers: Peers) -> None:
    web = cluster(1)
    endpoint = web.endpoints[0]
    state = ClusterState("c", dial=peers.dial)
    conn = await state.h1.connection(web, endpoint, None, None)
    host = state.host(endpoint)
    assert (state.connections, host.connections, host.idle) == (1, 1, [])
    await exchange(conn, peers.sockets[0])
    assert host.idle == [conn]
    assert state.h1.idle_connection(host) is conn
    assert state.h1.idle_connection(host) is None, "taken: no longer idle"
    await exchange(conn, peers.sockets[0])
    assert await state.h1.connection(web, endpoint, None, None) is conn
    assert (len(peers.sockets), state.connections) == (1, 1)
    conn.close()


async def one_held_one_waiting(
    peers: Peers, pool: m.ConnectionPool
) -> tuple[Cluster, Endpoint, ClusterState, UpstreamConnection, asyncio.Future[UpstreamConnection]]:
    """A one-endpoint cluster under `pool` whose one connection is taken and a second request
    queued for it: the cluster, its endpoint, its state, the connection and the waiter."""
    web = cluster(1, pool=pool)
    endpoint = web.endpoints[0]
    state = ClusterState("c", dial=peers.dial)
    first = await state.h1.connection(web, endpoint, None, None)
    waiting = asyncio.ensure_future(state.h1.connection(web, endpoint, None, None))
    await settle()
    return web, endpoint, state, first, waiting


@on_virtual_time
async def test_past_max_connections_a_request_waits_for_the_connection_handed_back(peers: Peers) -> None:
    _, endpoint, state, first, waiting = await one_held_one_waiting(peers, m.ConnectionPool(max_connections=1))
    assert (state.pending, len(state.host(endpoint).waiters)) == (1, 1)
    await exchange(first, peers.sockets[0])
    assert await waiting is first
    assert (state.pending, state.connections, len(peers.sockets)) == (0, 1, 1)
    first.close()


@on_virtual_time
async def test_the_pending_queue_overflows_past_http1_max_pending_requests(peers: Peers) -> None:
    pool = m.ConnectionPool(max_connections=1, http1_max_pending_requests=1)
    web, endpoint, state, first, waiting = await one_held_one_waiting(peers, pool)
    with pytest.raises(UpstreamFailure) as refused:
        await state.h1.connection(web, endpoint, None, None)
    assert refused.value.reply is OVERFLOW
    assert (state.pending, state.overflows) == (1, 1)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert (state.pending, len(state.host(endpoint).waiters)) == (0, 0), "a waiter that gave up leaves the queue"
    first.close()


@on_virtual_time
async def test_an_endpoint_without_a_connection_may_open_one_past_max_connections(peers: Peers) -> None:
    web = cluster(2, pool=m.ConnectionPool(max_connections=1))
    state = ClusterState("c", dial=peers.dial)
    conns = [await state.h1.connection(web, endpoint, None, None) for endpoint in web.endpoints]
    assert (state.connections, len(peers.sockets)) == (2, 2)
    for conn in conns:
        conn.close()


@on_virtual_time
async def test_a_lost_connection_hands_its_slot_to_a_waiter(peers: Peers) -> None:
    _, endpoint, state, first, waiting = await one_held_one_waiting(peers, m.ConnectionPool(max_connections=1))
    first.close()
    second = await waiting
    assert second is not first
    assert (state.connections, state.host(endpoint).connections, len(peers.sockets)) == (1, 1, 2)
    second.close()


@on_virtual_time
async def test_past_max_requests_per_connection_a_connection_is_closed_not_kept(peers: Peers) -> None:
    web = cluster(1, pool=m.ConnectionPool(max_requests_per_connection=1))
    endpoint = web.endpoints[0]
    state = ClusterState("c", dial=peers.dial)
    conn = await state.h1.connection(web, endpoint, None, None)
    await exchange(conn, peers.sockets[0])
    assert conn.closed and state.host(endpoint).idle == []
    await settle()
    assert (state.connections, state.host(endpoint).connections) == (0, 0), "its slot is free once it is gone"
