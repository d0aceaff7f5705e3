"""`Replay`, the request body kept for retries and mirrors, on a downstream body the test
feeds: read no faster than the current attempt takes it, the copy replayed to the next
attempt then continued live, abandoned past its bound; each mirror's copy fed alongside,
whatever the size, holding the body up only while it holds the bound unread, and given the
rest of a body the client has sent when the request ends first; and which body `kept_body`
keeps, with which retry policy."""

from __future__ import annotations

import asyncio

import pytest

from minimesh.dataplane.http1 import Body, Request
from minimesh.dataplane.proxy import BUFFER_LIMIT, kept_body
from minimesh.dataplane.replay import Replay
from minimesh.routing.retry import NO_RETRY, RetryDecider
from tests.bodies import whole
from tests.clocks import on_virtual_time, settle
from tests.unit.test_http2_upstream import call


def replay_of(*chunks: bytes, limit: int = 1000) -> tuple[Body, Replay]:
    source = Body()
    for chunk in chunks:
        source.feed(chunk)
    return source, Replay(source, limit, asyncio.get_running_loop())


@on_virtual_time
async def test_the_downstream_is_read_no_faster_than_the_attempt_takes_it() -> None:
    source, replay = replay_of(b"a", b"b", b"c")
    attempt = replay.body()
    await settle()
    assert (attempt.buffered, source.buffered) == (1, 2), "one chunk handed on, the rest left downstream"
    assert await attempt.read() == b"a"
    await settle()
    assert (attempt.buffered, source.buffered) == (1, 1)
    replay.close()


@on_virtual_time
async def test_a_retry_replays_the_copy_then_continues_live() -> None:
    source, replay = replay_of(b"one ", b"two ")
    first = replay.body()
    assert await first.read() == b"one "
    await settle()
    second = replay.body()
    source.feed(b"three")
    source.finish()
    assert await whole(second) == b"one two three", "each byte once, in order"
    assert not replay.overflowed
    third = replay.body()
    assert (await whole(third), third.complete) == (b"one two three", True), "a body already in is replayed whole"


@on_virtual_time
async def test_a_copy_past_its_bound_is_dropped_but_the_body_still_flows_to_attempt_and_mirror() -> None:
    source, replay = replay_of(b"x" * 6, limit=10)
    mirror = replay.tee()
    attempt = replay.body()
    source.feed(b"y" * 6)
    source.finish()
    both = await asyncio.gather(whole(attempt), whole(mirror))
    assert both == [b"x" * 6 + b"y" * 6] * 2, "the mirror streams it all the same"
    assert replay.overflowed, "no retry for a body past the bound"


@on_virtual_time
async def test_a_mirror_gets_each_chunk_as_it_arrives() -> None:
    source, replay = replay_of(b"ab", limit=100)
    mirror = replay.tee()
    attempt = replay.body()
    assert await attempt.read() == b"ab"
    assert await mirror.read() == b"ab", "before the rest of the body is in"
    replay.settle()
    source.feed(b"cd")
    source.finish()
    assert (await whole(attempt), await whole(mirror)) == (b"cd", b"cd")
    assert mirror.complete


@on_virtual_time
async def test_a_mirror_holding_the_bound_unread_holds_the_body_until_read_or_given_up() -> None:
    source, replay = replay_of(b"x" * 4, b"y" * 4, b"z" * 4, limit=4)
    slow, gone = replay.tee(), replay.tee()
    attempt = replay.body()
    assert await attempt.read() == b"x" * 4
    await settle()
    assert (source.buffered, slow.buffered) == (8, 4), "the mirrors each hold the bound: nothing more is read"
    assert await slow.read() == b"x" * 4
    await settle()
    assert source.buffered == 8, "a mirror still holds the bound"
    replay.untee(gone)
    assert await attempt.read() == b"y" * 4, "given up, it holds nothing up"
    assert await slow.read() == b"y" * 4
    replay.close()
    with pytest.raises(ConnectionResetError):
        await whole(slow)
    assert gone.buffered == 4, "a copy given up is fed no more"


@on_virtual_time
async def test_settling_without_mirrors_stops_the_copy() -> None:
    source, replay = replay_of(b"x" * 8, limit=10)
    attempt = replay.body()
    assert await attempt.read() == b"x" * 8
    replay.settle()
    source.feed(b"y" * 8)
    source.finish()
    assert await whole(attempt) == b"y" * 8
    assert not replay.overflowed, "nothing is recorded once no attempt can follow"


@on_virtual_time
async def test_a_downstream_failure_fails_the_attempt_and_close_stops_the_pump() -> None:
    source, replay = replay_of(b"a")
    attempt = replay.body()
    assert await attempt.read() == b"a"
    source.fail(ConnectionResetError("downstream closed the connection"))
    with pytest.raises(ConnectionResetError):
        await attempt.read()
    again = replay.body()
    assert await again.read() == b"a"
    with pytest.raises(ConnectionResetError):
        await again.read()

    source, replay = replay_of()
    replay.body()
    await settle()
    replay.close()
    await settle()
    source.feed(b"late")
    await settle()
    assert source.buffered == 4, "nothing reads the downstream once the request is over"


@on_virtual_time
async def test_a_mirror_gets_the_rest_of_a_body_the_client_has_sent_when_the_request_ends_first() -> None:
    source, replay = replay_of(b"a" * 4, b"b" * 4, limit=100)
    mirror = replay.tee()
    attempt = replay.body()
    await settle()
    source.feed(b"c" * 4)
    source.finish()
    await settle()
    assert source.buffered == 8, "the attempt's upstream answered without reading the body"
    replay.close()
    assert (await whole(mirror), mirror.complete) == (b"a" * 4 + b"b" * 4 + b"c" * 4, True)
    assert attempt.buffered == 4, "the attempt is fed no more"


def test_the_body_is_kept_as_bytes_within_the_bound_and_never_retried_past_it() -> None:
    retry = RetryDecider(attempts=2, any_5xx=True)

    def kept(size: int, complete: bool, mirrored: bool) -> tuple[type, type, RetryDecider]:
        source = Body()
        source.feed(b"x" * size)
        if complete:
            source.finish()
        body, replay, policy = kept_body(call(Request(b"POST", b"/", [], source)), retry, mirrored)
        return type(body), type(replay), policy

    assert kept(10, True, False) == (bytes, type(None), retry)
    assert kept(10, False, True) == (Body, Replay, retry), "still arriving: forwarded as it comes"
    assert kept(BUFFER_LIMIT + 1, True, False) == (Body, type(None), NO_RETRY)
    assert kept(BUFFER_LIMIT + 1, True, True) == (Body, Replay, NO_RETRY), "mirrored, and still never retried"
