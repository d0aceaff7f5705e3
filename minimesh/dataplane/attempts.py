"""The attempts step, as Envoy's router retries: an endpoint for each try (`ClusterState.pick`:
not ejected, not one already tried while others remain), sent within the per-try timeout, the
result recorded for outlier detection, and a retry of what the route's policy retries, with
Envoy's back-off.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import NoReturn

from minimesh.dataplane.call import Call
from minimesh.dataplane.deadline import Deadline
from minimesh.dataplane.http1 import Body, UpstreamResponse
from minimesh.dataplane.replay import Replay
from minimesh.dataplane.respond import Head
from minimesh.dataplane.upstream import (
    NO_HEALTHY_UPSTREAM,
    REFUSED_STREAM,
    UPSTREAM_TIMEOUT,
    Attempt,
    ClusterState,
    LocalReply,
    UpstreamFailure,
    Upstreams,
)
from minimesh.routing.pick import hash_key
from minimesh.routing.retry import RetryDecider
from minimesh.routing.snapshot import Cluster, Endpoint

RETRY_BACKOFF_BASE = 0.025
RETRY_BACKOFF_MAX = 0.250
"""Envoy's retry back-off: fully jittered, 25 ms base, at most 250 ms."""
RETRY_BUFFER_EXCEEDED = LocalReply(507, b"exceeded request buffer limit while retrying upstream", "")
RETRY_BUFFER_DETAILS = "request_payload_exceeded_retry_buffer_limit"
"""Envoy's answer when the copy of a body outgrows its bound while a retry waits for its back-off."""


async def attempts(
    call: Call,
    cluster: Cluster,
    state: ClusterState,
    decider: RetryDecider,
    upstreams: Upstreams,
    rng: random.Random,
    head: Head,
    body: Body | bytes,
    replay: Replay | None,
    deadline: Deadline | None,
) -> tuple[UpstreamResponse, Attempt]:
    """Attempts within the retry policy: the response to pass on and its attempt (which the
    caller ends once the body is through), or the failure to answer with; each attempt takes
    a body still arriving from `replay`. `URX`: retries used up; `UO`: refused by `maxRetries`."""
    settle = Settle(call, cluster, state, decider, replay)
    tried: list[Endpoint] = []
    attempt_count = 0
    retrying = False
    consistent = cluster.policy.load_balancer.consistent_hash
    key = hash_key(consistent, call.view) if consistent is not None else None
    original = call.exchange.original
    while True:
        attempt_count += 1
        endpoint = state.pick(cluster, rng, key, tried, original)
        if endpoint is None or (replay is not None and replay.overflowed):
            _no_attempt(call, state, retrying, endpoint is None)
        if replay is not None:
            body = replay.body()
        if decider.attempts:
            tried.append(endpoint)
        settle.begin(attempt_count, endpoint)
        attempt = state.attempt(endpoint, retry=retrying)
        retrying = False
        sent = time.monotonic()
        failure: UpstreamFailure | None = None
        try:
            if decider.per_try_timeout is None:
                response = await head.send(upstreams, cluster, endpoint, body, attempt_count, replay, deadline)
            else:
                async with call.deadline(decider.per_try_timeout):
                    response = await head.send(upstreams, cluster, endpoint, body, attempt_count, replay, deadline)
        except TimeoutError:
            failure = UpstreamFailure(UPSTREAM_TIMEOUT, endpoint)
        except UpstreamFailure as raised:
            raised.endpoint = endpoint
            failure = raised
        except asyncio.CancelledError:
            _cancelled(cluster, endpoint, state, attempt, deadline)
            raise
        finally:
            attempt.sent()
        if failure is not None:
            settle.failure(attempt_count, attempt, endpoint, failure)
        elif settle.response(attempt_count, attempt, endpoint, response, sent):
            return response, attempt
        retrying = True
        await _back_off(rng, attempt_count, state)


def _cancelled(
    cluster: Cluster, endpoint: Endpoint, state: ClusterState, attempt: Attempt, deadline: Deadline | None
) -> None:
    """An attempt cancelled (the client left, or a timeout): a route timeout counts against
    the endpoint, as Envoy's outlier detection takes it."""
    attempt.end()
    if deadline is not None and deadline.expired():
        state.record(cluster, endpoint, 504)


def _no_attempt(call: Call, state: ClusterState, retrying: bool, unhealthy: bool) -> NoReturn:
    """No attempt can start: no endpoint to pick (`UH`), or, for a retry waiting for its
    back-off, the copy of the body outgrew its bound (Envoy's 507)."""
    if retrying:
        state.retry_done()
    if unhealthy:
        raise UpstreamFailure(NO_HEALTHY_UPSTREAM)
    call.exchange.details = RETRY_BUFFER_DETAILS
    raise UpstreamFailure(RETRY_BUFFER_EXCEEDED)


class Settle:
    """How one request's attempts end: each result is recorded for outlier detection, then
    the retry policy decides whether another attempt follows. (A plain class: made per request.)"""

    __slots__ = ("call", "cluster", "decider", "replay", "state")

    def __init__(
        self, call: Call, cluster: Cluster, state: ClusterState, decider: RetryDecider, replay: Replay | None
    ) -> None:
        self.call = call
        self.cluster = cluster
        self.state = state
        self.decider = decider
        self.replay = replay

    def begin(self, count: int, endpoint: Endpoint) -> None:
        """Attempt `count` goes to `endpoint`, as the exchange records it."""
        exchange = self.call.exchange
        exchange.attempts = count
        exchange.destination = endpoint
        exchange.upstream_host = f"{endpoint.address}:{endpoint.port}"

    def response(
        self, count: int, attempt: Attempt, endpoint: Endpoint, response: UpstreamResponse, sent: float
    ) -> bool:
        """An attempt got its response head: True to pass it on, False when the policy retries
        it (the response is then dropped with its connection)."""
        self.call.exchange.upstream_time = time.monotonic() - sent
        self.state.record(self.cluster, endpoint, response.status)
        if not self.decider.retries_response(response.status, response.headers) or self._ends(count):
            return True
        attempt.end()
        response.conn.close()
        return False

    def failure(self, count: int, attempt: Attempt, endpoint: Endpoint, failure: UpstreamFailure) -> None:
        """An attempt failed before its response head: `failure` is raised unless the policy
        retries it."""
        attempt.end()
        self.state.record(self.cluster, endpoint, 504 if failure.reply is UPSTREAM_TIMEOUT else 503)
        refused = failure.reply is REFUSED_STREAM
        if not self.decider.retries_failure(failure.reply.flag, refused=refused) or self._ends(count):
            raise failure

    def _ends(self, count: int) -> bool:
        """Whether a retriable attempt ends the retries: the body could not be kept for another
        (as if the route had no retry policy, as Envoy drops it then), they are used up (`URX`),
        or `maxRetries` is reached across the cluster (`UO`); else one retry is counted in."""
        replay = self.replay
        if replay is not None and replay.overflowed:
            return True
        if count > self.decider.attempts:
            self.call.exchange.flags.append("URX")
            return True
        if not self.state.admit_retry(self.cluster.policy.connection_pool):
            self.call.exchange.flags.append("UO")
            return True
        return False


async def _back_off(rng: random.Random, count: int, state: ClusterState) -> None:
    """Wait before retry `count`, with Envoy's fully jittered back-off."""
    ceiling = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * (2**count - 1))
    try:
        await asyncio.sleep(rng.uniform(0, ceiling))
    except asyncio.CancelledError:
        state.retry_done()
        raise
