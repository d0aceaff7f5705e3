"""HTTP/1.1 framing, in memory: a real `Downstream` fed request bytes (in any split) with a
recording handler, and a real `UpstreamConnection` fed response bytes, over a transport that
only records. Heads, content-length and chunked bodies, keep-alive and pipelining, how each
response is framed, bad input, back-pressure, and the header and idle timeouts on virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from minimesh.dataplane.http1 import (
    DELAYED_CLOSE,
    PIPELINE_DEPTH,
    READ_HIGH_WATER,
    ConnectionLimits,
    Downstream,
    HeaderList,
    Request,
    Responder,
    UpstreamConnection,
    local_reply_bytes,
)
from tests.bodies import whole
from tests.clocks import on_virtual_time, settle


class Wire(asyncio.Transport):
    """A transport that records what is written, its end (FIN) and whether reading is paused;
    closing it tells the protocol, as a socket transport does, on the next pass of the loop."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.eof = False
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed and not self.eof, "written after the end"
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


@dataclass(frozen=True)
class Seen:
    """A request as the handler got it (its body is the answer's to read)."""

    method: bytes
    target: bytes
    version: bytes
    headers: HeaderList
    keep_alive: bool
    expects_continue: bool


Answer = Callable[[Request, Responder], Awaitable[None]]


async def echo(request: Request, responder: Responder) -> None:
    body = await whole(request.body)
    responder.send_whole(200, [], len(body), body)


@dataclass
class Client:
    """One downstream connection: bytes in, what the handler saw, bytes out."""

    conn: Downstream
    wire: Wire
    seen: list[Seen] = field(default_factory=list)
    rejected: list[tuple[int, int]] = field(default_factory=list)

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.conn.data_received(piece)

    def responses(self) -> list[tuple[int, HeaderList, bytes]]:
        return parse_responses(bytes(self.wire.written))


def client(answer: Answer = echo, limits: ConnectionLimits | None = None) -> Client:
    """A Downstream whose handler records each request, then lets `answer` answer it."""
    made: list[Client] = []

    async def handler(request: Request, responder: Responder) -> None:
        head = (request.method, request.target, request.version, list(request.headers))
        made[0].seen.append(Seen(*head, request.keep_alive, request.expects_continue))
        await answer(request, responder)

    def rejected(conn: Downstream, status: int, sent: int) -> None:
        made[0].rejected.append((status, sent))

    conn = Downstream(handler, limits=limits or ConnectionLimits(), on_reject=rejected)
    wire = Wire(conn)
    made.append(Client(conn, wire))
    conn.connection_made(wire)
    return made[0]


def recording(bodies: list[bytes]) -> Answer:
    """An answer that keeps each request body, then echoes it."""

    async def answer(request: Request, responder: Responder) -> None:
        body = await whole(request.body)
        bodies.append(body)
        responder.send_whole(200, [], len(body), body)

    return answer


class _Responses:
    def __init__(self) -> None:
        self.found: list[tuple[int, HeaderList, bytes]] = []
        self.headers: HeaderList = []
        self.body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.found.append((self.parser.get_status_code(), self.headers, self.body))


def parse_responses(data: bytes) -> list[tuple[int, HeaderList, bytes]]:
    responses = _Responses()
    responses.parser.feed_data(data)
    return responses.found


async def ended_by_a_local_reply(down: Client, replied_at: float) -> None:
    """Envoy's delayed close after a local reply: the end is written at once (FIN), what the
    client still sends is dropped, and the connection closes `DELAYED_CLOSE` after the reply."""
    assert down.wire.eof and not down.wire.closed
    answered = bytes(down.wire.written)
    down.send(b"GET /late HTTP/1.1\r\nhost: a\r\n\r\n")
    await asyncio.sleep(replied_at + DELAYED_CLOSE - asyncio.get_running_loop().time() - 0.01)
    assert not down.wire.closed
    await asyncio.sleep(0.02)
    assert down.wire.closed
    assert bytes(down.wire.written) == answered
    assert b"/late" not in b"".join(s.target for s in down.seen)


def splits(data: bytes) -> list[tuple[bytes, bytes]]:
    """`data` cut in two at every position."""
    return [(data[:at], data[at:]) for at in range(len(data) + 1)]


# ---------------------------------------------------------------- request heads

HEADS = {
    "names lower-cased, values and repeats kept in order": (
        b"GET /p?q=1 HTTP/1.1\r\nHost: a.example\r\nX-Multi: One\r\nx-multi: two\r\n\r\n",
        (b"GET", b"/p?q=1", b"1.1", [(b"host", b"a.example"), (b"x-multi", b"One"), (b"x-multi", b"two")], True),
    ),
    "absolute form, as HTTP_PROXY clients send it": (
        b"GET http://reviews:9080/r HTTP/1.1\r\nhost: reviews:9080\r\n\r\n",
        (b"GET", b"http://reviews:9080/r", b"1.1", [(b"host", b"reviews:9080")], True),
    ),
    "HTTP/1.1 asking to close": (
        b"DELETE /x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        (b"DELETE", b"/x", b"1.1", [(b"host", b"a"), (b"connection", b"close")], False),
    ),
    "HTTP/1.0 closes by default": (
        b"GET / HTTP/1.0\r\nhost: a\r\n\r\n",
        (b"GET", b"/", b"1.0", [(b"host", b"a")], False),
    ),
    "HTTP/1.0 asking for keep-alive": (
        b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n",
        (b"GET", b"/", b"1.0", [(b"host", b"a"), (b"connection", b"keep-alive")], True),
    ),
}


@pytest.mark.parametrize(("raw", "expected"), HEADS.values(), ids=HEADS.keys())
@on_virtual_time
async def test_a_request_head_is_parsed(raw: bytes, expected: tuple[Any, ...]) -> None:
    for first, rest in splits(raw):
        down = client()
        down.send(first, rest)
        await settle()
        (seen,) = down.seen
        assert (seen.method, seen.target, seen.version, seen.headers, seen.keep_alive) == expected


@on_virtual_time
async def test_expect_100_continue_is_seen_and_answered_before_the_body() -> None:
    down = client()
    down.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
    await settle()
    assert bytes(down.wire.written) == b"HTTP/1.1 100 Continue\r\n\r\n"
    down.send(b"ok")
    await settle()
    assert down.seen[0].expects_continue
    assert down.responses()[-1][2] == b"ok"


# ---------------------------------------------------------------- bodies

BODIES = {
    "content-length": (b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 11\r\n\r\nhello world", b"hello world"),
    "chunked, with an extension and a trailer": (
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
        b"hello world",
    ),
    "chunked, hexadecimal sizes": (
        b"PUT / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n" + b"1A\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n",
        b"z" * 26,
    ),
    "no body": (b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", b""),
    "content-length zero": (b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n", b""),
}


@pytest.mark.parametrize(("raw", "body"), BODIES.values(), ids=BODIES.keys())
@on_virtual_time
async def test_a_body_arrives_whole_however_the_bytes_are_split(raw: bytes, body: bytes) -> None:
    for first, rest in splits(raw):
        bodies: list[bytes] = []
        down = client(recording(bodies))
        down.send(first, rest)
        await settle()
        assert bodies == [body], (first, rest)
        assert [r[2] for r in down.responses()] == [body]


@on_virtual_time
async def test_a_body_arriving_a_byte_at_a_time_streams_to_the_handler() -> None:
    chunks: list[bytes] = []

    async def stream(request: Request, responder: Responder) -> None:
        while chunk := await request.body.read():
            chunks.append(chunk)
        responder.send_whole(204, [], None, b"")

    down = client(stream)
    down.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
    for byte in b"3\r\nabc\r\n0\r\n\r\n":
        down.send(bytes([byte]))
        await settle()
    assert b"".join(chunks) == b"abc"
    assert down.responses()[0][0] == 204


# ---------------------------------------------------------------- keep-alive and pipelining


@on_virtual_time
async def test_pipelined_requests_are_served_and_answered_in_order() -> None:
    bodies: list[bytes] = []
    down = client(recording(bodies))
    down.send(
        b"POST /1 HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\n1"
        b"POST /2 HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\n2\r\n0\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nhost: a\r\n\r\n"
    )
    await settle()
    assert [s.target for s in down.seen] == [b"/1", b"/2", b"/3"]
    assert [r[2] for r in down.responses()] == [b"1", b"2", b""]
    assert not down.wire.closed


@on_virtual_time
async def test_keep_alive_serves_request_after_request_on_one_connection() -> None:
    down = client()
    for number in range(3):
        down.send(b"GET /%d HTTP/1.1\r\nhost: a\r\n\r\n" % number)
        await settle()
        assert len(down.responses()) == number + 1
    assert all(not any(name == b"connection" for name, _ in r[1]) for r in down.responses())
    assert not down.wire.closed


@on_virtual_time
async def test_a_request_asking_to_close_is_answered_with_close_then_closed() -> None:
    down = client()
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    await settle()
    ((status, headers, _),) = down.responses()
    assert (status, (b"connection", b"close") in headers) == (200, True)
    assert down.wire.closed


@on_virtual_time
async def test_requests_pipelined_after_a_close_are_ignored_not_the_close_itself() -> None:
    down = client()
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\nGET /never HTTP/1.1\r\nhost: a\r\n\r\n")
    await settle()
    assert [s.target for s in down.seen] == [b"/"]
    assert [r[0] for r in down.responses()] == [200]
    assert down.wire.closed


@on_virtual_time
async def test_too_many_pipelined_requests_pause_reading_until_the_queue_drains() -> None:
    release = asyncio.Event()

    async def held(request: Request, responder: Responder) -> None:
        await release.wait()
        responder.send_whole(200, [], 0, b"")

    down = client(held)
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n" * (PIPELINE_DEPTH + 2))
    await settle()
    assert not down.wire.reading
    release.set()
    await settle()
    assert down.wire.reading
    assert len(down.responses()) == PIPELINE_DEPTH + 2


@on_virtual_time
async def test_a_body_buffered_past_the_high_water_mark_pauses_reading_until_read() -> None:
    release = asyncio.Event()

    async def slow_reader(request: Request, responder: Responder) -> None:
        await release.wait()
        body = await whole(request.body)
        responder.send_whole(200, [], len(body), body)

    down = client(slow_reader)
    size = READ_HIGH_WATER + 10
    down.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % size)
    await settle()
    down.send(b"b" * READ_HIGH_WATER, b"b" * 10)
    await settle()
    assert not down.wire.reading
    release.set()
    await settle()
    assert down.wire.reading
    assert down.responses()[0][0] == 200


# ---------------------------------------------------------------- response framing


def scripted(status: int, headers: HeaderList, length: int | None, chunks: tuple[bytes, ...]) -> Answer:
    async def answer(request: Request, responder: Responder) -> None:
        responder.send_head(status, headers, length)
        for chunk in chunks:
            responder.send(chunk)
        responder.end()

    return answer


FRAMING = {
    "a length": (
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", (200, [(b"x-a", b"1")], 5, (b"hel", b"lo")),
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\n\r\nhello", False,
    ),
    "no length on HTTP/1.1: chunked": (
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", (200, [], None, (b"ab", b"", b"c" * 17)),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n11\r\n" + b"c" * 17 + b"\r\n0\r\n\r\n",
        False,
    ),
    "no length on HTTP/1.0: close-delimited": (
        b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n", (200, [], None, (b"abc",)),
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc", True,
    ),
    "HEAD: the head only": (
        b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n", (200, [], None, (b"never",)),
        b"HTTP/1.1 200 OK\r\n\r\n", False,
    ),
    "204: no framing": (
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", (204, [], None, ()),
        b"HTTP/1.1 204 No Content\r\n\r\n", False,
    ),
    "the upstream's framing headers are dropped, the rest kept in order": (
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        (200, [(b"x-b", b"2"), (b"content-length", b"99"), (b"transfer-encoding", b"chunked"),
               (b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5"), (b"x-a", b"1")], 2, (b"ok",)),
        b"HTTP/1.1 200 OK\r\nx-b: 2\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok", False,
    ),
    "an unknown status": (
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", (299, [], 0, ()), b"HTTP/1.1 299 Unknown\r\ncontent-length: 0\r\n\r\n",
        False,
    ),
}  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "response", "wire", "closes"), FRAMING.values(), ids=FRAMING.keys())
@on_virtual_time
async def test_a_response_is_framed_as_its_request_and_length_allow(
    request_bytes: bytes, response: tuple[Any, ...], wire: bytes, closes: bool
) -> None:
    down = client(scripted(*response))
    down.send(request_bytes)
    await settle()
    assert bytes(down.wire.written) == wire
    assert down.wire.closed == closes


@on_virtual_time
async def test_a_whole_response_is_framed_as_the_same_response_sent_in_parts() -> None:
    async def at_once(request: Request, responder: Responder) -> None:
        responder.send_whole(201, [(b"x-a", b"1")], None, b"abc", reason_phrase=b"Made")

    async def parts(request: Request, responder: Responder) -> None:
        responder.send_head(201, [(b"x-a", b"1")], None, reason_phrase=b"Made")
        responder.send(b"abc")
        responder.end()

    written = []
    for answer in (at_once, parts):
        down = client(answer)
        down.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        await settle()
        written.append(bytes(down.wire.written))
    assert written[0] == written[1]
    assert written[0].startswith(b"HTTP/1.1 201 Made\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n")


def test_a_local_reply_is_framed_as_envoy_frames_one() -> None:
    reply = local_reply_bytes(503, b"no healthy upstream", close=True)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert lines[1:3] == [b"content-length: 19", b"content-type: text/plain"]
    assert lines[3].startswith(b"date: ") and lines[4:] == [b"server: istio-envoy", b"connection: close"]
    assert body == b"no healthy upstream"
    assert b"content-type" not in local_reply_bytes(404, b"", close=False)


# ---------------------------------------------------------------- bad input


@on_virtual_time
async def test_a_malformed_request_is_400_then_closed() -> None:
    down = client()
    sent = asyncio.get_running_loop().time()
    down.send(b"GET / HTTP/1.1\r\nhost a\r\n\r\n")
    await settle()
    ((status, headers, body),) = down.responses()
    assert (status, body, (b"connection", b"close") in headers) == (400, b"Bad Request", True)
    assert down.rejected == [(400, len(b"Bad Request"))]
    assert down.seen == []
    await ended_by_a_local_reply(down, sent)


@on_virtual_time
async def test_a_head_past_the_limit_is_431() -> None:
    limits = ConnectionLimits(max_header_bytes=200)
    down = client(limits=limits)
    sent = asyncio.get_running_loop().time()
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"v" * 200 + b"\r\n\r\n")
    await settle()
    assert down.responses()[0][0] == 431
    assert down.rejected == [(431, len(b"Request Header Fields Too Large"))]
    await ended_by_a_local_reply(down, sent)
    small = client(limits=limits)
    small.send(b"GET / HTTP/1.1\r\nhost: a\r\nx-small: " + b"v" * 100 + b"\r\n\r\n")
    await settle()
    assert small.responses()[0][0] == 200


@on_virtual_time
async def test_a_bad_chunk_in_a_body_being_served_stops_its_handler_and_is_its_400() -> None:
    stopped: list[BaseException] = []

    async def reader(request: Request, responder: Responder) -> None:
        try:
            await whole(request.body)
        except asyncio.CancelledError as exc:
            stopped.append(exc)
            raise

    down = client(reader)
    down.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await settle()
    sent = asyncio.get_running_loop().time()
    down.send(b"zz\r\n")
    await settle()
    assert len(stopped) == 1
    assert [(r[0], r[2]) for r in down.responses()] == [(400, b"Bad Request")]
    assert down.rejected == [], "the 400 is the request's own response, not a refusal before routing"
    await ended_by_a_local_reply(down, sent)


# ---------------------------------------------------------------- timeouts, on virtual time


@on_virtual_time
async def test_a_head_not_finished_within_the_headers_timeout_is_408_and_closed() -> None:
    loop = asyncio.get_running_loop()
    down = client(limits=ConnectionLimits(headers_timeout=10, idle_timeout=300))
    down.send(b"GET / HTTP/1.1\r\nhost: exa")
    began = loop.time()
    await asyncio.sleep(9.9)
    assert down.wire.written == b""
    await asyncio.sleep(0.2)
    assert down.responses()[0][0] == 408
    assert down.rejected == [(408, 0)]
    assert loop.time() - began == pytest.approx(10.1)
    await ended_by_a_local_reply(down, began + 10)


@on_virtual_time
async def test_an_idle_connection_is_closed_without_a_word() -> None:
    down = client(limits=ConnectionLimits(headers_timeout=10, idle_timeout=60))
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    await settle()
    answered = bytes(down.wire.written)
    await asyncio.sleep(59.9)
    assert not down.wire.closed
    await asyncio.sleep(0.2)
    assert down.wire.closed
    assert bytes(down.wire.written) == answered


@on_virtual_time
async def test_the_idle_timeout_counts_from_the_last_answer_not_the_first() -> None:
    down = client(limits=ConnectionLimits(headers_timeout=5, idle_timeout=0.4))
    for _ in range(3):
        down.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        await asyncio.sleep(0.3)
        assert not down.wire.closed
    await asyncio.sleep(0.2)
    assert down.wire.closed
    assert len(down.responses()) == 3


@on_virtual_time
async def test_a_head_begun_on_an_idle_connection_gets_the_shorter_headers_timeout() -> None:
    down = client(limits=ConnectionLimits(headers_timeout=1, idle_timeout=300))
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    await settle()
    begun = asyncio.get_running_loop().time()
    down.send(b"GET / HTTP/1.1\r\nhost: exa")
    await asyncio.sleep(1.1)
    assert [r[0] for r in down.responses()] == [200, 408]
    await ended_by_a_local_reply(down, begun + 1)


@on_virtual_time
async def test_a_request_being_served_is_never_cut_by_the_idle_timeout() -> None:
    async def slow(request: Request, responder: Responder) -> None:
        await asyncio.sleep(100)
        responder.send_whole(200, [], 0, b"")

    down = client(slow, limits=ConnectionLimits(headers_timeout=5, idle_timeout=10))
    down.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    await asyncio.sleep(100.1)
    assert not down.wire.closed
    assert down.responses()[0][0] == 200
    await asyncio.sleep(10)
    assert down.wire.closed


# ---------------------------------------------------------------- the upstream side


def upstream(idle: list[UpstreamConnection]) -> tuple[UpstreamConnection, Wire]:
    conn = UpstreamConnection(idle.append, None)
    wire = Wire(conn)
    conn.connection_made(wire)
    return conn, wire


async def exchange(conn: UpstreamConnection, *pieces: bytes, head_request: bool = False) -> tuple[int, bytes]:
    """Send a GET, feed the response `pieces`; the status and the body as read to its end."""
    sent = asyncio.ensure_future(conn.exchange(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", b"", head_request=head_request))
    await settle()
    for piece in pieces:
        conn.data_received(piece)
        await settle()
    response = await sent
    return response.status, await whole(response.body)


RESPONSES = {
    "content-length": ((b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",), (200, b"hello"), True),
    "chunked": (
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"),
        (200, b"abcde"),
        True,
    ),
    "the upstream asks to close": (
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",),
        (200, b"x"),
        False,
    ),
    "204 has no body": ((b"HTTP/1.1 204 No Content\r\n\r\n",), (204, b""), True),
    "interim 100 is skipped": (
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"),
        (201, b"ok"),
        True,
    ),
}


@pytest.mark.parametrize(("pieces", "expected", "reusable"), RESPONSES.values(), ids=RESPONSES.keys())
@on_virtual_time
async def test_an_upstream_response_is_read_to_its_end(
    pieces: tuple[bytes, ...], expected: tuple[int, bytes], reusable: bool
) -> None:
    idle: list[UpstreamConnection] = []
    conn, wire = upstream(idle)
    assert await exchange(conn, *pieces) == expected
    assert (idle == [conn], conn.idle, wire.closed) == (reusable, reusable, not reusable)


@on_virtual_time
async def test_a_close_delimited_response_ends_when_the_upstream_closes() -> None:
    idle: list[UpstreamConnection] = []
    conn, _ = upstream(idle)
    sent = asyncio.ensure_future(conn.exchange(b"GET / HTTP/1.0\r\n\r\n", b""))
    await settle()
    conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nold ")
    conn.data_received(b"server")
    response = await sent
    conn.connection_lost(None)
    assert await whole(response.body) == b"old server"
    assert (response.keep_alive, idle) == (False, [])


@on_virtual_time
async def test_a_head_response_has_no_body_whatever_its_length_says() -> None:
    idle: list[UpstreamConnection] = []
    conn, _ = upstream(idle)
    status, body = await exchange(conn, b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", head_request=True)
    assert (status, body) == (200, b"")
    assert idle == [], "a HEAD exchange leaves the connection out of the pool"
