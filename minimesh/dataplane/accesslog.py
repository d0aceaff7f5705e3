"""The access log, an `Exchange` observer: one line per request (or per TCP connection, in
Envoy's TCP form: `"- - -" 0 FLAGS`, bytes each way, upstream host and cluster, SNI) in
Istio's default format (TEXT or JSON) plus the source and destination workload, buffered and
written once per loop tick. `start_time` is module-level on purpose: a cache of the formatted
second, a pure function of its input, shared by every log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from minimesh.dataplane.exchange import Exchange

log = logging.getLogger("minimesh")

STDOUT = "/dev/stdout"
DETAILS = {
    "NR": "route_not_found",
    "FI": "fault_filter_abort",
    "UH": "no_healthy_upstream",
    "UF": "upstream_reset_before_response_started{connection_failure}",
    "UC": "upstream_reset_before_response_started{connection_termination}",
    "UO": "upstream_reset_before_response_started{overflow}",
    "UT": "response_timeout",
    "UPE": "upstream_reset_before_response_started{protocol_error}",
    "RBAC": "rbac_access_denied_matched_policy[none]",
}
"""Envoy's %RESPONSE_CODE_DETAILS% for the proxy's own answers, by access-log flag."""


class _StartTimes:
    """Envoy's %START_TIME% (`2026-11-23T00:00:00.000Z`), its date and time of day formatted once
    a second; the milliseconds are those of `datetime.fromtimestamp` (microseconds rounded half to
    even, then cut)."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, started: float) -> str:
        second = int(started)
        micros = round((started - second) * 1e6)
        if micros >= 1_000_000:
            second += 1
            micros -= 1_000_000
        if second != self._second:
            self._prefix = f"{datetime.fromtimestamp(second, UTC):%Y-%m-%dT%H:%M:%S}"
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}Z"


start_time = _StartTimes()


def response_code_details(exchange: Exchange) -> str:
    """Why the response is what it is, in Envoy's words (a TCP connection has none)."""
    if exchange.tcp:
        return "-"
    if exchange.details:
        return exchange.details
    for flag in exchange.flags:
        detail = DETAILS.get(flag)
        if detail is not None:
            return detail
    if exchange.upstream_time is not None:
        return "via_upstream"
    if exchange.route and exchange.status:
        return "direct_response"
    return "-"


def source_workload(exchange: Exchange) -> str | None:
    """Who sent the request (`Exchange.source`); None when not known."""
    source = exchange.source
    return None if source is None else source.name


def downstream_local(exchange: Exchange) -> str | None:
    """%DOWNSTREAM_LOCAL_ADDRESS%: where a captured connection was headed, else the listener."""
    if exchange.original is not None:
        return f"{exchange.original[0]}:{exchange.original[1]}"
    listener = exchange.listener
    return f"{listener.address}:{listener.port}" if listener.address else None


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def fields(exchange: Exchange) -> dict[str, Any]:
    """Every field of Istio's default format, by its JSON name; None where unknown."""
    destination = exchange.destination
    return {
        "start_time": start_time(exchange.started),
        "method": exchange.method,
        "path": exchange.path,
        "protocol": exchange.protocol,
        "response_code": exchange.status,
        "response_flags": exchange.flag_text,
        "response_code_details": response_code_details(exchange),
        "connection_termination_details": None,
        "upstream_transport_failure_reason": None,
        "bytes_received": exchange.bytes_received,
        "bytes_sent": exchange.bytes_sent,
        "duration": _ms(exchange.duration),
        "upstream_service_time": _ms(exchange.upstream_time),
        "x_forwarded_for": exchange.forwarded_for or None,
        "user_agent": exchange.user_agent or None,
        "request_id": exchange.request_id,
        "authority": exchange.authority or None,
        "upstream_host": exchange.upstream_host or None,
        "upstream_cluster": exchange.cluster or None,
        "upstream_local_address": None,
        "downstream_local_address": downstream_local(exchange),
        "downstream_remote_address": exchange.downstream or None,
        "requested_server_name": exchange.sni or None,
        "route_name": None if exchange.tcp else exchange.route or None,
        "source_workload": source_workload(exchange),
        "destination_workload": destination.workload.name if destination and destination.workload else None,
    }


def text_line(exchange: Exchange) -> str:
    """`[START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS ...`, `-` for what is unknown: the
    fields of `fields`, in its order, formatted straight from the exchange."""
    destination = exchange.destination
    upstream_time = exchange.upstream_time
    return (
        f'[{start_time(exchange.started)}] "{exchange.method} {exchange.path} {exchange.protocol}" '
        f"{exchange.status} {exchange.flag_text} {response_code_details(exchange)} - "
        f'"-" {exchange.bytes_received} {exchange.bytes_sent} {int(exchange.duration * 1000)} '
        f"{'-' if upstream_time is None else int(upstream_time * 1000)} "
        f'"{exchange.forwarded_for or "-"}" "{exchange.user_agent or "-"}" "{exchange.request_id}" '
        f'"{exchange.authority or "-"}" "{exchange.upstream_host or "-"}" {exchange.cluster or "-"} - '
        f"{downstream_local(exchange) or '-'} {exchange.downstream or '-'} "
        f"{exchange.sni or '-'} {'-' if exchange.tcp else exchange.route or '-'} {source_workload(exchange) or '-'} "
        + (destination.workload.name if destination and destination.workload else "-")
    )


def json_line(exchange: Exchange) -> str:
    return json.dumps(fields(exchange), separators=(",", ":"))


ENCODINGS: dict[str, Callable[[Exchange], str]] = {"TEXT": text_line, "JSON": json_line}


class AccessLog:
    """Writes a line per exchange to the configured file; `configure` follows MeshConfig."""

    def __init__(self) -> None:
        self.path = ""
        self.encode: Callable[[Exchange], str] = text_line
        self._file: IO[str] | None = None
        self._pending: list[str] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        """The daemon's loop, kept: asking for the running loop costs a `getpid()` on Python 3.11."""

    def configure(self, path: str, encoding: str) -> None:
        """Switch to `path` ("" turns the log off) and `encoding` (TEXT or JSON)."""
        self.encode = ENCODINGS.get(encoding.upper(), text_line)
        if path == self.path:
            return
        self.flush()
        self._close_file()
        self.path = path
        if not path:
            return
        if path == STDOUT:
            self._file = sys.stdout
            return
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open; closed by close())
        except OSError as exc:
            log.error("minimesh: error: cannot open access log %s: %s; access log off", path, exc)
            self.path = ""

    def __call__(self, exchange: Exchange) -> None:
        if self._file is None:
            return
        self._pending.append(self.encode(exchange))
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._file is None:
            self._pending.clear()
            return
        lines, self._pending = self._pending, []
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.error("minimesh: error: cannot write the access log %s: %s; access log off", self.path, exc)
            self._close_file()
            self.path = ""

    def _close_file(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def close(self) -> None:
        self.flush()
        self._close_file()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path or 'off'} pending={len(self._pending)}>"
