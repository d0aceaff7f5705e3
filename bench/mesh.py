"""The minimesh side of the bench: its mesh.yaml, the gateway process, reload latency.

The gateway is the real daemon (`minimesh up --no-docker`) when the installed minimesh
has `up` and it comes up serving; otherwise `bench/gateway.py` assembles the same pieces
in-process, and the output says which one was measured and why.
"""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from procs import LOOPBACK, Pinning, Process, free_port, wait_http

PLAIN = "/plain"
RESILIENT = "/resilient"
RELOAD = "/reload"
RELOAD_HEADER = "x-bench-generation"

MESH = """\
# minimesh bench: one gateway, a plain route, a route with resilience, a route reloads change.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench}}
spec:
  hosts: ["*"]
  gateways: [bench-gateway]
  http:
  - name: resilient
    match: [{{uri: {{prefix: {resilient}}}}}]
    route: [{{destination: {{host: web-resilient, port: {{number: 80}}}}}}]
    timeout: 5s
    retries: {{attempts: 2, perTryTimeout: 2s, retryOn: "5xx,connect-failure,reset"}}
  - name: reload
    match: [{{uri: {{prefix: {reload}}}}}]
    route: [{{destination: {{host: web, port: {{number: 80}}}}}}]
    headers: {{response: {{set: {{{header}: "{generation}"}}}}}}
  - name: plain
    route: [{{destination: {{host: web, port: {{number: 80}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web-resilient}}
spec:
  host: web-resilient
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    connectionPool:
      tcp: {{maxConnections: 10000}}
      http: {{http1MaxPendingRequests: 10000, http2MaxRequests: 10000, maxRetries: 1000}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web-resilient}}
spec: {{selector: {{app: web-resilient}}, ports: [{{name: http, port: 80}}]}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-1}}
spec: {{address: 127.0.0.1, ports: {{http: {first}}}, labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-resilient-1}}
spec: {{address: 127.0.0.1, ports: {{http: {first}}}, labels: {{app: web-resilient}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-resilient-2}}
spec: {{address: 127.0.0.1, ports: {{http: {second}}}, labels: {{app: web-resilient}}}}
"""


def render(upstreams: tuple[int, int], generation: int = 0) -> str:
    first, second = upstreams
    return MESH.format(
        resilient=RESILIENT, reload=RELOAD, header=RELOAD_HEADER, generation=generation, first=first, second=second
    )


@dataclass(slots=True)
class Gateway:
    """The process serving the gateway, and what it is."""

    process: Process
    port: int
    admin_port: int | None
    daemon: bool
    why_not_daemon: str = ""
    loop: str = ""
    loop_note: str = ""

    def describe(self) -> str:
        if self.daemon:
            return f"`minimesh up --no-docker` (subprocess, pid {self.process.pid})"
        loop = f"on {self.loop}" + (f" (minimesh {self.loop_note})" if self.loop_note else "")
        return (
            f"bench/gateway.py, the data plane assembled in-process with no access log or metrics, {loop}; "
            f"because {self.why_not_daemon}"
        )


def _minimesh() -> str:
    return str(Path(sys.executable).with_name("minimesh"))


def daemon_missing() -> str | None:
    """Why `minimesh up` cannot be used, or None if the installed minimesh has it."""
    try:
        done = subprocess.run([_minimesh(), "up", "--help"], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"the minimesh command cannot run ({exc})"
    except subprocess.TimeoutExpired:
        return "`minimesh up --help` hung"
    if done.returncode != 0:
        return "`minimesh up` does not exist yet"
    return None


def start_gateway(workdir: Path, mesh_dir: Path, pinning: Pinning, *, try_daemon: bool = True) -> Gateway:
    why_not = daemon_missing() if try_daemon else "--no-daemon was given"
    if why_not is None:
        port, admin, tls = free_port(), free_port(), free_port()
        cmd = [_minimesh(), "up", "--no-docker", "-f", str(mesh_dir), "--gateway-port", str(port),
               "--gateway-tls-port", str(tls), "--admin-port", str(admin)]  # fmt: skip
        daemon_dir = workdir / "daemon"
        daemon_dir.mkdir(exist_ok=True)
        process = Process("minimesh up", pinning.server_cmd(cmd), workdir / "minimesh-up.log", cwd=daemon_dir)
        problem = wait_http(port, PLAIN, process, time.monotonic() + 30)
        if problem is None:
            return Gateway(process, port, admin, daemon=True)
        process.stop()
        why_not = f"`minimesh up` did not serve ({problem}; log {process.log}: {process.tail(3)!r})"
    loop_note = ""
    for loop in ("uvloop", "asyncio") if uvloop_version() else ("asyncio",):
        port = free_port()
        script = Path(__file__).with_name("gateway.py")
        cmd = [sys.executable, str(script), "--config", str(mesh_dir), "--port", str(port), "--loop", loop]
        process = Process(f"bench gateway ({loop})", pinning.server_cmd(cmd), workdir / f"bench-gateway-{loop}.log")
        problem = wait_http(port, PLAIN, process, time.monotonic() + (5 if loop == "uvloop" else 30))
        if problem is None:
            return Gateway(process, port, None, daemon=False, why_not_daemon=why_not, loop=loop, loop_note=loop_note)
        process.stop()
        loop_note = f"fails on uvloop: {first_error(process.log) or problem}"
    raise RuntimeError(f"{problem}\n{process.tail()}")


def uvloop_version() -> str | None:
    try:
        import uvloop
    except ImportError:
        return None
    return str(uvloop.__version__)


def first_error(log: Path) -> str:
    """The first exception in a log, with the line that raised it."""
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "Traceback")) and "Error" in line.partition(":")[0]:
            where = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].lstrip().startswith("File")), "")
            code = lines[i - 1].strip() if i else ""
            return f"{line.strip()} at {where.replace(str(Path(__file__).resolve().parent.parent) + '/', '')}: {code}"
    return ""


def measure_reload(gateway: Gateway, mesh_file: Path, upstreams: tuple[int, int], changes: int = 10,
                   deadline_each: float = 5.0) -> dict[str, object]:  # fmt: skip
    """Rewrite mesh.yaml (atomically) `changes` times, each changing a response header on one
    route; time from the write to the first answer that carries the new value."""
    staging = mesh_file.parent.parent / f".{mesh_file.name}.next"
    conn = http.client.HTTPConnection(LOOPBACK, gateway.port, timeout=2)
    times: list[float] = []
    missed = 0
    try:
        for generation in range(1, changes + 1):
            staging.write_text(render(upstreams, generation))
            os.replace(staging, mesh_file)
            written = time.monotonic()
            live = _poll(conn, str(generation), written + deadline_each)
            if live is None:
                missed += 1
            else:
                times.append(live - written)
            time.sleep(0.3)
    finally:
        conn.close()
    result: dict[str, object] = {"changes": changes, "missed": missed, "deadline_s": deadline_each}
    if times:
        result |= {
            "median_ms": statistics.median(times) * 1000,
            "min_ms": min(times) * 1000,
            "max_ms": max(times) * 1000,
        }
    return result


def _poll(conn: http.client.HTTPConnection, want: str, deadline: float) -> float | None:
    """When the gateway first answered with `want` in the reload header, or None by the deadline."""
    while time.monotonic() < deadline:
        try:
            conn.request("GET", RELOAD)
            response = conn.getresponse()
            response.read()
            seen = response.getheader(RELOAD_HEADER)
        except (OSError, http.client.HTTPException):
            conn.close()
            seen = None
        if seen == want:
            return time.monotonic()
        time.sleep(0.001)
    return None
