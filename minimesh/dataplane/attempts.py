"""The attempts step, as Envoy's router retries: an endpoint for each try (`ClusterState.pick`:
not ejected, not one already tried while others remain), sent within the per-try timeout, the
result recorded for outlier detection, and a retry of what the route's policy retries, with
Envoy's back-off.
"""

from __future__ import annotations

import asyncio
import random
import time

from minimesh.config import model as m
from minimesh.dataplane.call import Call
from minimesh.dataplane.deadline import Deadline
from minimesh.dataplane.http1 import Body, UpstreamResponse
from minimesh.dataplane.respond import Head
from minimesh.dataplane.upstream import (
    NO_HEALTHY_UPSTREAM,
    REFUSED_STREAM,
    UPSTREAM_TIMEOUT,
    Attempt,
    ClusterState,
    UpstreamFailure,
    Upstreams,
)
from minimesh.routing.pick import hash_key
from minimesh.routing.retry import RetryDecider
from minimesh.routing.snapshot import Cluster, Endpoint

RETRY_BACKOFF_BASE = 0.025
RETRY_BACKOFF_MAX = 0.250
"""Envoy's retry back-off: fully jittered, 25 ms base, at most 250 ms."""


async def attempts(
    call: Call,
    cluster: Cluster,
    state: ClusterState,
    decider: RetryDecider,
    upstreams: Upstreams,
    rng: random.Random,
    head: Head,
    body: Body | bytes,
    deadline: Deadline | None,
) -> tuple[UpstreamResponse, Attempt]:
    """Attempts within the retry policy: the response to pass on and its attempt (which the
    caller ends once the body is through), or the failure to answer with. Exhausted retries
    add `URX`; a retry refused by `maxRetries` adds `UO`."""
    exchange = call.exchange
    pool = cluster.policy.connection_pool
    tried: list[Endpoint] = []
    attempt_count = 0
    retrying = False
    consistent = cluster.policy.load_balancer.consistent_hash
    key = hash_key(consistent, call.view) if consistent is not None else None
    original = call.exchange.original
    while True:
        attempt_count += 1
        endpoint = state.pick(cluster, rng, key, tried, original)
        if endpoint is None:
            if retrying:
                state.retry_done()
            raise UpstreamFailure(NO_HEALTHY_UPSTREAM)
        if decider.attempts:
            tried.append(endpoint)
        exchange.attempts = attempt_count
        exchange.destination = endpoint
        exchange.upstream_host = f"{endpoint.address}:{endpoint.port}"
        attempt = state.attempt(endpoint, retry=retrying)
        retrying = False
        sent = time.monotonic()
        failure: UpstreamFailure | None = None
        try:
            if decider.per_try_timeout is None:
                response = await head.send(upstreams, cluster, endpoint, body, attempt_count)
            else:
                async with call.deadline(decider.per_try_timeout):
                    response = await head.send(upstreams, cluster, endpoint, body, attempt_count)
        except TimeoutError:
            failure = UpstreamFailure(UPSTREAM_TIMEOUT, endpoint)
        except UpstreamFailure as raised:
            raised.endpoint = endpoint
            failure = raised
        except asyncio.CancelledError:
            attempt.end()
            if deadline is not None and deadline.expired():
                state.record(cluster, endpoint, 504)
            raise
        finally:
            attempt.sent()
        if failure is not None:
            attempt.end()
            state.record(cluster, endpoint, 504 if failure.reply is UPSTREAM_TIMEOUT else 503)
            refused = failure.reply is REFUSED_STREAM
            if not decider.retries_failure(failure.reply.flag, refused=refused) or _no_retry(
                attempt_count, decider, state, pool, call
            ):
                raise failure
        else:
            exchange.upstream_time = time.monotonic() - sent
            state.record(cluster, endpoint, response.status)
            retried = decider.retries_response(response.status, response.headers)
            if not retried or _no_retry(attempt_count, decider, state, pool, call):
                return response, attempt
            attempt.end()
            response.conn.close()
        retrying = True
        ceiling = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * (2**attempt_count - 1))
        try:
            await asyncio.sleep(rng.uniform(0, ceiling))
        except asyncio.CancelledError:
            state.retry_done()
            raise


def _no_retry(attempt: int, decider: RetryDecider, state: ClusterState, pool: m.ConnectionPool, call: Call) -> bool:
    """Whether a retriable attempt ends the retries: they are used up (`URX`), or
    `maxRetries` is reached across the cluster (`UO`); else one retry is counted in."""
    if attempt > decider.attempts:
        call.exchange.flags.append("URX")
        return True
    if not state.admit_retry(pool):
        call.exchange.flags.append("UO")
        return True
    return False
