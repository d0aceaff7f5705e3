"""Weighted draws and load balancers: pure, seeded, and stable where they must be."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from minimesh.config import model as m
from minimesh.routing.pick import (
    LeastRequest,
    Random,
    RingHash,
    RoundRobin,
    balancer_for,
    choose_weighted,
    hash_key,
    request_cookie,
    set_cookie,
)
from minimesh.routing.request import RequestView
from minimesh.routing.snapshot import CookieAffinity, Endpoint, Policy

ENDPOINTS = tuple(Endpoint(None, f"10.0.0.{i}", 9080) for i in range(1, 5))


@pytest.mark.parametrize(
    ("weights", "shares"),
    [
        ((50, 50), (0.5, 0.5)),
        ((100, 0), (1.0, 0.0)),
        ((0, 100), (0.0, 1.0)),
        ((1, 3), (0.25, 0.75)),
        ((20, 30, 50), (0.2, 0.3, 0.5)),
        ((0,), (1.0,)),
        ((7,), (1.0,)),
    ],
)
def test_choose_weighted_gives_each_weight_over_the_sum(weights: tuple[int, ...], shares: tuple[float, ...]) -> None:
    rng = random.Random(11)
    drawn = Counter(choose_weighted(weights, rng) for _ in range(4000))
    for index, share in enumerate(shares):
        assert abs(drawn[index] / 4000 - share) < 0.03
        if share == 0.0:
            assert drawn[index] == 0


def test_choose_weighted_is_reproducible_with_a_seed() -> None:
    first = [choose_weighted((30, 70), random.Random(5)) for _ in range(10)]
    assert first == [choose_weighted((30, 70), random.Random(5)) for _ in range(10)]


def test_round_robin_visits_every_endpoint_in_turn() -> None:
    balancer = RoundRobin(ENDPOINTS, random.Random(1))
    picks = [balancer.pick() for _ in range(8)]
    assert set(picks[:4]) == set(ENDPOINTS) and picks[:4] == picks[4:]
    assert repr(balancer).startswith("<RoundRobin endpoints=4 next=")


def test_round_robin_skips_excluded_endpoints() -> None:
    balancer = RoundRobin(ENDPOINTS, random.Random(1))
    assert {balancer.pick(exclude={ENDPOINTS[0]}) for _ in range(9)} == set(ENDPOINTS[1:])
    assert balancer.pick(exclude=set(ENDPOINTS)) is None


def test_least_request_prefers_the_less_busy_of_two_choices() -> None:
    busy = {ENDPOINTS[0]: 10, ENDPOINTS[1]: 10, ENDPOINTS[2]: 10, ENDPOINTS[3]: 0}
    balancer = LeastRequest(ENDPOINTS, random.Random(2), busy.__getitem__)
    drawn = Counter(balancer.pick() for _ in range(2000))
    # P(idle endpoint among two draws) = 1 - (3/4)^2 = 7/16
    assert abs(drawn[ENDPOINTS[3]] / 2000 - 7 / 16) < 0.04
    assert LeastRequest((), random.Random(2)).pick() is None


def test_random_is_roughly_uniform() -> None:
    balancer = Random(ENDPOINTS, random.Random(3))
    drawn = Counter(balancer.pick() for _ in range(4000))
    assert all(abs(count - 1000) < 120 for count in drawn.values())


def test_ring_hash_is_stable_per_key() -> None:
    ring = RingHash(ENDPOINTS, random.Random(4))
    keys = [f"user-{i}" for i in range(200)]
    first = {key: ring.pick(key=key) for key in keys}
    again = RingHash(ENDPOINTS, random.Random(99))
    assert all(again.pick(key=key) == chosen for key, chosen in first.items())
    assert len(set(first.values())) == 4


def test_ring_hash_moves_only_the_keys_of_a_removed_endpoint() -> None:
    ring = RingHash(ENDPOINTS, random.Random(4))
    smaller = RingHash(ENDPOINTS[:3], random.Random(4))
    for key in (f"user-{i}" for i in range(200)):
        before = ring.pick(key=key)
        if before != ENDPOINTS[3]:
            assert smaller.pick(key=key) == before
        assert ring.pick(key=key, exclude={ENDPOINTS[3]}) == smaller.pick(key=key)


def test_ring_hash_without_a_key_picks_at_random() -> None:
    ring = RingHash(ENDPOINTS, random.Random(4))
    assert len({ring.pick() for _ in range(100)}) > 1
    assert RingHash((), random.Random(4)).pick(key="x") is None


@pytest.mark.parametrize(
    ("load_balancer", "kind"),
    [
        (m.LoadBalancer(simple="LEAST_REQUEST"), LeastRequest),
        (m.LoadBalancer(simple="ROUND_ROBIN"), RoundRobin),
        (m.LoadBalancer(simple="RANDOM"), Random),
        (m.LoadBalancer(simple="PASSTHROUGH"), Random),
        (m.LoadBalancer(consistent_hash=m.ConsistentHash(use_source_ip=True)), RingHash),
    ],
)
def test_balancer_for_a_policy(load_balancer: m.LoadBalancer, kind: type) -> None:
    assert isinstance(balancer_for(Policy(load_balancer=load_balancer), ENDPOINTS, random.Random(0)), kind)


def test_balancer_for_passes_active_counts_to_least_request() -> None:
    balancer = balancer_for(Policy(), ENDPOINTS[:2], random.Random(0), active=lambda e: 0 if e is ENDPOINTS[1] else 5)
    drawn = Counter(balancer.pick() for _ in range(2000))
    # two draws with replacement: the idle one wins unless both land on the busy one
    assert abs(drawn[ENDPOINTS[1]] / 2000 - 3 / 4) < 0.04


REQUEST = RequestView(
    "GET",
    "/p?user=jane&x=1",
    "reviews",
    {"x-user": "bob", "cookie": "session=abc; theme=dark"},
    peer="10.9.9.9:40123",
)


@pytest.mark.parametrize(
    ("consistent", "key"),
    [
        (m.ConsistentHash(http_header_name="X-User"), "bob"),
        (m.ConsistentHash(http_header_name="x-missing"), None),
        (m.ConsistentHash(http_cookie_name="session"), "abc"),
        (m.ConsistentHash(http_cookie_name="nope"), None),
        (m.ConsistentHash(use_source_ip=True), "10.9.9.9"),
        (m.ConsistentHash(http_query_parameter_name="user"), "jane"),
        (m.ConsistentHash(), None),
    ],
)
def test_hash_keys_come_from_the_request(consistent: m.ConsistentHash, key: str | None) -> None:
    assert hash_key(consistent, REQUEST) == key


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("session=abc", "abc"),
        ('theme=dark;session="abc"', "abc"),
        ("theme=dark;   session=a=b", "a=b"),
        ("session=; session=later", None),
        ("xsession=abc; session", None),
        ("", None),
    ],
)
def test_cookies_are_read_as_envoy_reads_them(header: str, value: str | None) -> None:
    request = RequestView("GET", "/", "web", {"cookie": header} if header else {})
    assert request_cookie(request, "session") == value


def client(peer: str, cookie: str = "") -> RequestView:
    return RequestView("GET", "/", "web", {"cookie": cookie} if cookie else {}, peer=peer)


def test_a_missing_cookie_with_a_ttl_is_made_from_the_connection() -> None:
    sticky = m.ConsistentHash(http_cookie_name="session", http_cookie_ttl=60.0)
    first, again, other = client("10.0.0.1:5000"), client("10.0.0.1:5000"), client("10.0.0.1:5001")
    made = hash_key(sticky, first)
    assert made is not None and len(made) == 16 and int(made, 16) >= 0
    assert hash_key(sticky, again) == made != hash_key(sticky, other)
    assert hash_key(sticky, client("10.0.0.9:7000", f"session={made}")) == made
    assert hash_key(m.ConsistentHash(http_cookie_name="session"), first) is None


@pytest.mark.parametrize(
    ("consistent", "header"),
    [
        (m.ConsistentHash(http_cookie_name="s", http_cookie_ttl=3600.0, http_cookie_path="/"),
         's="V"; Max-Age=3600; Path=/; HttpOnly'),
        (m.ConsistentHash(http_cookie_name="s", http_cookie_ttl=1.9), 's="V"; Max-Age=1; HttpOnly'),
        (m.ConsistentHash(http_cookie_name="s", http_cookie_ttl=0.0), 's="V"; HttpOnly'),
        (m.ConsistentHash(http_cookie_name="s", http_cookie_ttl=10.0,
                          http_cookie_attributes=(("SameSite", "Strict"), ("Secure", ""))),
         's="V"; Max-Age=10; SameSite=Strict; Secure; HttpOnly'),
    ],
)  # fmt: skip
def test_the_affinity_cookie_is_written_as_envoy_writes_it(consistent: m.ConsistentHash, header: str) -> None:
    affinity = CookieAffinity.of(consistent)
    assert affinity is not None and affinity.header("V").decode() == header


@pytest.mark.parametrize(
    "consistent",
    [m.ConsistentHash(http_cookie_name="s"), m.ConsistentHash(http_header_name="x", http_cookie_ttl=5.0), None],
)
def test_no_cookie_is_set_without_a_cookie_ttl(consistent: m.ConsistentHash | None) -> None:
    assert CookieAffinity.of(consistent) is None
    assert Policy(load_balancer=m.LoadBalancer(consistent_hash=consistent)).cookie is None


def test_set_cookie_only_when_the_request_lacks_the_cookie() -> None:
    sticky = m.ConsistentHash(http_cookie_name="s", http_cookie_ttl=5.0)
    policy = Policy(load_balancer=m.LoadBalancer(consistent_hash=sticky))
    assert policy.cookie is not None
    new = client("10.0.0.1:5000")
    made = hash_key(sticky, new)
    assert set_cookie(policy.cookie, new) == f's="{made}"; Max-Age=5; HttpOnly'.encode()
    assert set_cookie(policy.cookie, client("10.0.0.1:5000", f"s={made}")) is None
