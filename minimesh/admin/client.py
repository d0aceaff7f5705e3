"""The admin API from outside the daemon: what `status`, `wait` and `up --detach` ask it.

Plain blocking HTTP (urllib): these commands ask a few questions and exit.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:15000"
POLL_INTERVAL = 0.1


class NoDaemon(Exception):
    """Nothing answers at the admin URL."""


def get(url: str, timeout: float = 2.0, *, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    """Status and body of a request to `url` (GET unless `method`); NoDaemon when nothing answers."""
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("content-type", "application/yaml")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise NoDaemon(str(getattr(exc, "reason", exc))) from exc


def get_json(admin: str, path: str) -> Any:
    status, body = get(admin.rstrip("/") + path)
    if status != 200:
        raise NoDaemon(f"{path} answered {status}")
    return json.loads(body)


def is_ready(admin: str) -> bool:
    try:
        return get(admin.rstrip("/") + "/ready", timeout=1.0)[0] == 200
    except NoDaemon:
        return False


def wait_ready(admin: str, timeout: float) -> bool:
    """Poll `/ready` until it answers 200 (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if is_ready(admin):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def _endpoint_text(endpoint: dict[str, Any]) -> str:
    who = f" {endpoint['workload']}" if endpoint.get("workload") else ""
    health = endpoint["health"]
    if endpoint.get("timesEjected"):
        health += f" (ejected {endpoint['timesEjected']}x so far)"
    return f"{endpoint['address']}:{endpoint['port']}{who} {health}"


def _protocol_text(cluster: dict[str, Any]) -> str:
    """A service port's protocol: `HTTP (declared)`, or detected from the client's first bytes."""
    declared = cluster.get("protocolDeclared")
    if declared is None:
        return "-"
    return f"{cluster['protocol']} (declared)" if declared else "detected (sniffed)"


def status_lines(admin: str, dump: dict[str, Any], clusters: list[dict[str, Any]]) -> list[str]:
    """`minimesh status`: what a running daemon serves, from its `/config_dump` and `/clusters`."""
    sources = ", ".join(dump.get("sources") or []) or "no files"
    lines = [f"minimesh at {admin}: config generation {dump['generation']}, loaded {dump['loadedAt']} from {sources}"]
    error = dump.get("lastReloadError")
    if error:
        lines.append("last reload error (still serving the generation above):")
        lines += [f"  {line}" for line in error]
    else:
        lines.append("last reload error: none")
    if dump.get("internalErrors"):
        lines.append(f"internal errors: {dump['internalErrors']} (bugs in minimesh; the daemon's log has their "
                     "tracebacks: please report them)")  # fmt: skip
    lines.append("listeners:")
    by_workload: dict[str, str] = {}
    captured: set[str] = set()
    for listener in dump.get("listeners", []):
        where = f"{listener['address']}:{listener['port']}"
        if listener["kind"] == "gateway":
            bound = ", ".join(listener["gateways"]) or "no Gateway"
            lines.append(f"  gateway  http://{where}  ({bound})")
        elif listener["address"]:
            by_workload[listener["workload"]] = where
            lines.append(f"  sidecar  {where}  of {listener['workload']} (explicit)")
        elif listener["kind"] == "sidecar":
            captured.add(listener["workload"])
    if captured:
        lines.append(f"  netns capture in {len(captured)} containers: outbound :15001, inbound :15006 in each")
    lines.append("services:")
    for cluster in clusters:
        if cluster.get("subset") is None:
            endpoints = ", ".join(_endpoint_text(e) for e in cluster["endpoints"]) or "no endpoints"
            lines.append(f"  {cluster['host']}:{cluster['port']}  {_protocol_text(cluster)}  {endpoints}")
    lines.append("workloads:")
    for workload in dump.get("workloads", []):
        sidecar = by_workload.get(workload["name"])
        capture = f"explicit sidecar (HTTP_PROXY=http://{sidecar})" if sidecar else "none"
        if workload["name"] in captured:
            capture = "netns (transparent)"
        lines.append(f"  {workload['name']}.{workload['namespace']}  {workload['address']}  capture {capture}")
    return lines
