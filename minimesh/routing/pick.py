"""Picking with an injected rng: the weighted split of a route, the load balancers that
choose one endpoint of a cluster (round robin, least request, random, ring hash), and the
hash key and affinity cookie of consistent hashing.

Pure objects: the caller passes what it knows (active requests, ejected endpoints).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from minimesh.config.model import ConsistentHash
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import CookieAffinity, Endpoint, Policy


def choose_weighted(weights: Sequence[int], rng: random.Random) -> int:
    """The index drawn for relative `weights`: each gets weight/sum; 0 gets none.

    A lone destination gets everything whatever its weight; all-zero weights (which the
    loader rejects) fall back to the first.
    """
    total = sum(weights)
    if len(weights) == 1 or total <= 0:
        return 0
    roll = rng.randrange(total)
    for index, weight in enumerate(weights):
        if roll < weight:
            return index
        roll -= weight
    return len(weights) - 1


Active = Callable[[Endpoint], int]
"""How many requests an endpoint has in flight, as the data plane counts them."""


def idle(endpoint: Endpoint) -> int:
    """The `Active` of a caller that counts nothing: every endpoint is idle."""
    return 0


class Balancer(Protocol):
    """Chooses one endpoint; `exclude` holds ejected or already-tried endpoints."""

    def pick(self, *, key: str | None = None, exclude: Collection[Endpoint] = ()) -> Endpoint | None: ...


def _candidates(endpoints: tuple[Endpoint, ...], exclude: Collection[Endpoint]) -> tuple[Endpoint, ...]:
    return tuple(e for e in endpoints if e not in exclude) if exclude else endpoints


@dataclass(slots=True)
class RoundRobin:
    """Each endpoint in turn, starting at a random one (as Envoy does per worker)."""

    endpoints: tuple[Endpoint, ...]
    rng: random.Random = field(repr=False)
    counter: int = -1

    def pick(self, *, key: str | None = None, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        candidates = _candidates(self.endpoints, exclude)
        if not candidates:
            return None
        if self.counter < 0:
            self.counter = self.rng.randrange(len(candidates))
        chosen = candidates[self.counter % len(candidates)]
        self.counter += 1
        return chosen

    def __repr__(self) -> str:
        return f"<RoundRobin endpoints={len(self.endpoints)} next={max(self.counter, 0)}>"


@dataclass(slots=True)
class LeastRequest:
    """Envoy's LEAST_REQUEST: two random choices, the one with fewer active requests wins."""

    endpoints: tuple[Endpoint, ...]
    rng: random.Random = field(repr=False)
    active: Active = field(repr=False, default=idle)
    choices: int = 2

    def pick(self, *, key: str | None = None, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        candidates = _candidates(self.endpoints, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        best = candidates[self.rng.randrange(len(candidates))]
        for _ in range(self.choices - 1):
            other = candidates[self.rng.randrange(len(candidates))]
            if self.active(other) < self.active(best):
                best = other
        return best

    def __repr__(self) -> str:
        return f"<LeastRequest endpoints={len(self.endpoints)} choices={self.choices}>"


@dataclass(slots=True)
class Random:
    """A uniformly random endpoint."""

    endpoints: tuple[Endpoint, ...]
    rng: random.Random = field(repr=False)

    def pick(self, *, key: str | None = None, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        candidates = _candidates(self.endpoints, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        return candidates[self.rng.randrange(len(candidates))]

    def __repr__(self) -> str:
        return f"<Random endpoints={len(self.endpoints)}>"


RING_POINTS_PER_ENDPOINT = 128


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and run (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(slots=True)
class RingHash:
    """Consistent hashing on a ring: one key goes to one endpoint while the set is stable,
    and only the keys of a removed endpoint move. Without a key it picks at random."""

    endpoints: tuple[Endpoint, ...]
    rng: random.Random = field(repr=False)
    ring: tuple[int, ...] = field(init=False, repr=False)
    owners: tuple[Endpoint, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        points = sorted(
            (stable_hash(f"{endpoint.address}:{endpoint.port}#{i}"), endpoint)
            for endpoint in self.endpoints
            for i in range(RING_POINTS_PER_ENDPOINT)
        )
        self.ring = tuple(point for point, _ in points)
        self.owners = tuple(endpoint for _, endpoint in points)

    def pick(self, *, key: str | None = None, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        if key is None:
            candidates = _candidates(self.endpoints, exclude)
            return candidates[self.rng.randrange(len(candidates))] if candidates else None
        if not self.ring:
            return None
        start = bisect.bisect_left(self.ring, stable_hash(key))
        for step in range(len(self.ring)):
            owner = self.owners[(start + step) % len(self.ring)]
            if owner not in exclude:
                return owner
        return None

    def __repr__(self) -> str:
        return f"<RingHash endpoints={len(self.endpoints)} points={len(self.ring)}>"


SIMPLE_BALANCERS: dict[str, Callable[[tuple[Endpoint, ...], random.Random, Active | None], Balancer]] = {
    "ROUND_ROBIN": lambda endpoints, rng, active: RoundRobin(endpoints, rng),
    "LEAST_REQUEST": lambda endpoints, rng, active: LeastRequest(endpoints, rng, active or idle),
    "RANDOM": lambda endpoints, rng, active: Random(endpoints, rng),
    "PASSTHROUGH": lambda endpoints, rng, active: Random(endpoints, rng),
}
"""`loadBalancer.simple` → the balancer that implements it (Policy normalizes the name)."""


def balancer_for(
    policy: Policy, endpoints: tuple[Endpoint, ...], rng: random.Random, active: Active | None = None
) -> Balancer:
    """The balancer a cluster's merged policy asks for."""
    if policy.load_balancer.consistent_hash is not None:
        return RingHash(endpoints, rng)
    return SIMPLE_BALANCERS[policy.load_balancer.simple or "LEAST_REQUEST"](endpoints, rng, active)


def request_cookie(request: RequestView, name: str) -> str | None:
    """The value of cookie `name` as Envoy reads it (the first one of that name, surrounding
    double quotes dropped); None when there is none or it is empty, which Envoy treats alike."""
    header = request.headers.get("cookie")
    if not header:
        return None
    for pair in header.split(";"):
        key, sep, value = pair.lstrip(" ").partition("=")
        if sep and key == name:
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


def new_cookie(request: RequestView) -> str:
    """The value Envoy gives a new affinity cookie: a 64-bit hash of the downstream connection
    in 16 hex digits, so the requests of one connection race to one cookie."""
    return f"{stable_hash(request.peer):016x}"


def hash_key(consistent: ConsistentHash, request: RequestView) -> str | None:
    """The key consistent hashing uses for `request`, or None when the request lacks it. A
    cookie with a ttl that the request lacks is made (`new_cookie`): the key is its value."""
    if consistent.http_header_name:
        return request.headers.get(consistent.http_header_name.lower())
    if consistent.http_cookie_name:
        value = request_cookie(request, consistent.http_cookie_name)
        if value is None and consistent.http_cookie_ttl is not None:
            return new_cookie(request)
        return value
    if consistent.use_source_ip:
        return request.source_address or None
    if consistent.http_query_parameter_name:
        return request.query_params().get(consistent.http_query_parameter_name)
    return None


def set_cookie(affinity: CookieAffinity, request: RequestView) -> bytes | None:
    """The `Set-Cookie` Envoy adds to the upstream's response when `request` lacked the
    affinity cookie: the very value `hash_key` picked its endpoint by."""
    if request_cookie(request, affinity.name) is not None:
        return None
    return affinity.header(new_cookie(request))
