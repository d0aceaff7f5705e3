"""Open-loop load at a fixed rate, with latency measured so coordinated omission shows.

Request i is due at `start + i / rate` whatever happened to earlier ones; a request never
waits for a busy connection (a new keep-alive connection is opened instead, up to a cap),
so a slow answer cannot delay the sends after it. Each request's latency is taken twice:
from its scheduled time (includes any lateness of this generator, and queueing) and from
the moment its bytes were written (DESIGN §5's "from the actual send"). The lateness of
the sends is reported too, so the two can be told apart.

Run as a script (pinned to the load core) it prints one JSON object; `run()` does that
from the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

SPIN_BELOW = 0.002
"""With --spin, waits shorter than this yield to the loop instead of sleeping (timers are
millisecond-grained); the generator then owns its core."""
MAX_CONNECTIONS = 256
DRAIN_TIMEOUT = 5.0


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.chunked_from = -1
        self.scheduled = 0.0
        self.sent = 0.0
        self.measured = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, scheduled: float, measured: bool) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.measured = measured
        self.sent = time.monotonic()
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buffer += data
        while self._complete():
            self.client.done(self, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)

    def _complete(self) -> bool:
        """Is a whole response in the buffer? Consumes it if so."""
        buffer = self.buffer
        if self.need < 0 and self.chunked_from < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            length = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                self.chunked_from = end + 4
            else:
                self.need = end + 4 + length
        if self.chunked_from >= 0:
            start = self.chunked_from
            if buffer.startswith(b"0\r\n\r\n", start):
                stop = start + 5
            else:
                found = buffer.find(b"\r\n0\r\n\r\n", start)
                if found < 0:
                    return False
                stop = found + 7
            del buffer[:stop]
            self.chunked_from = -1
            return True
        if len(buffer) < self.need:
            return False
        del buffer[: self.need]
        self.need = -1
        return True


class Client:
    """The pool of connections and the measurements."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: minimesh-bench\r\n\r\n".encode()
        self.idle: list[Connection] = []
        self.waiting: collections.deque[tuple[float, bool]] = collections.deque()
        self.opening: set[asyncio.Task[None]] = set()
        self.opened = 0
        self.outstanding = 0
        self.from_scheduled: list[float] = []
        self.from_send: list[float] = []
        self.lag: list[float] = []
        self.status_errors = 0
        self.connect_errors = 0
        self.lost_in_flight = 0
        self.quiet = asyncio.Event()

    async def open(self) -> Connection:
        loop = asyncio.get_running_loop()
        self.opened += 1
        _, connection = await loop.create_connection(lambda: Connection(self), self.host, self.port)
        return connection

    def submit(self, scheduled: float, measured: bool) -> None:
        self.outstanding += 1
        self.quiet.clear()
        if self.idle:
            self.idle.pop().send(scheduled, measured)
        elif self.opened < MAX_CONNECTIONS:
            task = asyncio.get_running_loop().create_task(self._open_and_send(scheduled, measured))
            self.opening.add(task)
            task.add_done_callback(self.opening.discard)
        else:
            self.waiting.append((scheduled, measured))

    async def _open_and_send(self, scheduled: float, measured: bool) -> None:
        try:
            connection = await self.open()
        except OSError:
            self.connect_errors += 1
            self._finished()
            return
        connection.send(scheduled, measured)

    def done(self, connection: Connection, now: float) -> None:
        if connection.measured:
            self.from_scheduled.append(now - connection.scheduled)
            self.from_send.append(now - connection.sent)
            self.lag.append(connection.sent - connection.scheduled)
            if connection.status != 200:
                self.status_errors += 1
        if self.waiting:
            connection.send(*self.waiting.popleft())
        else:
            connection.scheduled = 0.0
            self.idle.append(connection)
        self._finished()

    def lost(self, connection: Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)
        elif connection.scheduled:
            self.lost_in_flight += 1
            self._finished()
        self.opened -= 1

    def _finished(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self.quiet.set()

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()


async def drive(
    host: str, port: int, path: str, rate: float, warmup: float, duration: float, spin: bool
) -> dict[str, Any]:
    client = Client(host, port, path)
    for _ in range(8):
        client.idle.append(await client.open())
    interval = 1.0 / rate
    warm = round(warmup * rate)
    total = warm + round(duration * rate)
    start = time.monotonic() + 0.01
    for i in range(total):
        scheduled = start + i * interval
        while True:
            delay = scheduled - time.monotonic()
            if delay <= 0:
                break
            if spin and delay < SPIN_BELOW:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(delay - SPIN_BELOW / 2 if spin else delay)
        client.submit(scheduled, i >= warm)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.quiet.wait(), DRAIN_TIMEOUT)
    measured = total - warm
    client.close()
    return {
        "rate": rate,
        "duration_s": duration,
        "sent": measured,
        "completed": len(client.from_send),
        "unanswered": measured - len(client.from_send),
        "status_errors": client.status_errors,
        "connect_errors": client.connect_errors,
        "connections": client.opened,
        "from_scheduled": summary(client.from_scheduled),
        "from_send": summary(client.from_send),
        "send_lag": summary(client.lag),
    }


def summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        rank = max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))
        return ordered[rank] * 1000

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000}


def run(port: int, path: str, *, rate: float, warmup: float, duration: float, load_cmd: list[str], spin: bool,
        log: Path) -> dict[str, Any]:  # fmt: skip
    """The generator in its own process (`load_cmd` pins it); its JSON result."""
    cmd = [*load_cmd, sys.executable, str(Path(__file__)), "--port", str(port), "--path", path, "--rate", str(rate),
           "--warmup", str(warmup), "--duration", str(duration), *(["--spin"] if spin else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=warmup + duration + 30, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"open-loop generator failed (exit {done.returncode}); see {log}:\n{done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--spin", action="store_true", help="own the core: yield instead of sleeping close to a send")
    args = parser.parse_args()
    coroutine = drive(args.host, args.port, args.path, args.rate, args.warmup, args.duration, args.spin)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coroutine)
        result["uvloop"] = False
    else:
        result = uvloop.run(coroutine)
        result["uvloop"] = True
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
