"""The TCP part of `make bench` (DESIGN §5): a client container talking to a server container
(redis-server, and a bulk sender) directly, through nginx's `stream` proxy in the same
two-hop shape as the sidecars (one nginx in the client's network namespace, one in the
server's), and through minimesh's two sidecars (netns capture). `redis-benchmark -t
ping,set,get` gives requests/s, the bulk transfer bytes/s; reported as ratios to nginx,
each the median of per-round ratios (the three paths run side by side in each round, so a
busy machine slows them alike). Merges into bench/results.json under "tcp"; prints a table.

Two client/server pairs: one outside the mesh (direct, and nginx beside each), one in it.
Needs root and a Docker Engine (says why it measured nothing otherwise); containers and one
network of its own, labelled, all removed at the end, even when stopped; bounded by BUDGET.
Pinned when there are two cores: the proxies (both nginx, or the daemon) on one, the clients,
the load and the servers on the other.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker import TAG, Daemon, bounded, docker, ensure_images, record, say
from procs import Pinning

TOOLS = "minimesh/tools:local"
NETWORK = f"{TAG}-net"
BUDGET = 300
ROUNDS = 3
REQUESTS = 10000
"""Per redis-benchmark test and round."""
CLIENTS = 50
BULK_BYTES = 256 << 20
"""Per round."""
REDIS_PORT, BULK_PORT = 6379, 9000
NGINX_REDIS, NGINX_BULK = 16379, 19000
"""The client-side nginx listens on these; the server-side one on each plus one."""
TARGETS = {"redis": 0.6, "bulk": 0.5}

MESH = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-server}
spec:
  host: mesh-server
"""

BULK_SERVER = """
import socket, sys, threading
CHUNK = memoryview(bytes(1 << 20))
def serve(conn):
    with conn:
        line = b""
        while not line.endswith(b"\\n"):
            part = conn.recv(64)
            if not part:
                return
            line += part
        left = int(line)
        while left > 0:
            left -= conn.send(CHUNK[: min(left, len(CHUNK))])
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
"""On the port given, sends as many bytes as the client's first line asks for, then closes."""

BULK_CLIENT = """
import json, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buffer = bytearray(1 << 20)
started = time.perf_counter()
got, error = 0, "closed"
try:
    with socket.create_connection((host, port), timeout=20) as conn:
        conn.sendall(b"%d\\n" % size)
        while n := conn.recv_into(buffer):
            got += n
except OSError as exc:
    error = repr(exc)
print(json.dumps({"bytes": got, "seconds": time.perf_counter() - started, "error": error}))
"""
"""Asks the bulk sender for SIZE bytes and reads them to the end; how many came, how long it took."""

NGINX = """\
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
stream {{
    server {{ listen {listen_redis}; proxy_pass {upstream}:{upstream_redis}; }}
    server {{ listen {listen_bulk}; proxy_pass {upstream}:{upstream_bulk}; }}
}}
"""


def cpus(core: int | None) -> list[str]:
    return ["--cpuset-cpus", str(core)] if core is not None else []


def run(name: str, *args: str, core: int | None, network: str = NETWORK) -> None:
    """docker run -d, labelled as this bench's, named TAG-NAME."""
    docker("run", "-d", "--name", f"{TAG}-{name}", "--network", network, "--label", f"minimesh.bench={TAG}",
           *cpus(core), *args)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Way:
    """One way from a client container to the servers."""

    name: str
    client: str
    host: str
    redis_port: int
    bulk_port: int


def start_pair(kind: str, pinning: Pinning, in_mesh: bool) -> tuple[str, str]:
    """A server container (redis-server + bulk sender, alias KIND-server) and a client; their names."""
    ports = f"minimesh.port=tcp:{REDIS_PORT},tcp:{BULK_PORT}"
    labels = ["--label", f"minimesh.service={kind}-server", "--label", ports] if in_mesh else []
    run(f"{kind}-server", "--network-alias", f"{kind}-server", *labels, TOOLS, "sh", "-c",
        'redis-server --protected-mode no --save "" --daemonize yes && exec python3 -c "$0" "$1"',
        BULK_SERVER, str(BULK_PORT), core=pinning.load)  # fmt: skip
    labels = ["--label", f"minimesh.service={kind}-client", "--label", "minimesh.port=http:80"] if in_mesh else []
    run(f"{kind}-client", *labels, TOOLS, "sleep", "infinity", core=pinning.load)
    client = f"{TAG}-{kind}-client"
    wait_pong(client, f"{kind}-server", REDIS_PORT, f"redis-server in the {kind} server container")
    return f"{TAG}-{kind}-server", client


def in_client(client: str, *command: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", "exec", client, *command], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip
    return done.stdout + done.stderr


def ping(client: str, host: str, port: int) -> str:
    return in_client(client, "timeout", "10", "redis-cli", "-h", host, "-p", str(port), "PING", timeout=30).strip()


def wait_pong(client: str, host: str, port: int, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (answer := ping(client, host, port)) != "PONG":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer PING within {seconds} s: {answer[-300:]!r}")
        time.sleep(0.3)


def redis_rps(way: Way) -> dict[str, int] | str:
    """requests/s of each redis-benchmark test, or what went wrong."""
    out = in_client(way.client, "timeout", "90", "redis-benchmark", "-h", way.host, "-p", str(way.redis_port),
                    "-t", "ping,set,get", "-n", str(REQUESTS), "-c", str(CLIENTS), "--csv")  # fmt: skip
    found = {line[0]: line[1] for line in csv.reader(out.splitlines()) if len(line) > 1 and line[0] != "test"}
    if found and all(value.replace(".", "", 1).isdigit() for value in found.values()):
        return {test: round(float(value)) for test, value in found.items()}
    return f"redis-benchmark: {out[-300:]!r}"


def bulk_bytes_per_s(way: Way) -> int | str:
    """One bulk transfer's bytes/s, or what went wrong."""
    out = in_client(way.client, "python3", "-c", BULK_CLIENT, way.host, str(way.bulk_port), str(BULK_BYTES))
    try:
        result = json.loads(out.splitlines()[-1])
    except (ValueError, IndexError):
        return f"bulk client: {out[-300:]!r}"
    if result["bytes"] != BULK_BYTES:
        return f"bulk: {result['error']} after {result['bytes']} of {BULK_BYTES} bytes"
    return round(BULK_BYTES / result["seconds"])


def nginx_pair(server: str, client: str, pinning: Pinning) -> None:
    """nginx `stream` in the server's namespace (to its loopback) and in the client's (to the server)."""
    address = docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}', server)
    shell = 'printf "%s" "$0" > /tmp/nginx.conf && exec nginx -c /tmp/nginx.conf'
    near_server = NGINX.format(listen_redis=NGINX_REDIS + 1, listen_bulk=NGINX_BULK + 1, upstream="127.0.0.1",
                               upstream_redis=REDIS_PORT, upstream_bulk=BULK_PORT)  # fmt: skip
    near_client = NGINX.format(listen_redis=f"127.0.0.1:{NGINX_REDIS}", listen_bulk=f"127.0.0.1:{NGINX_BULK}",
                               upstream=address, upstream_redis=NGINX_REDIS + 1,
                               upstream_bulk=NGINX_BULK + 1)  # fmt: skip
    run("nginx-server", TOOLS, "sh", "-c", shell, near_server, network=f"container:{server}", core=pinning.server)
    run("nginx-client", TOOLS, "sh", "-c", shell, near_client, network=f"container:{client}", core=pinning.server)
    wait_pong(client, "127.0.0.1", NGINX_REDIS, "redis-server through the two nginx")


def median_ratio(rounds: list[dict[str, Any]], a: str, b: str, key: Callable[[dict[str, Any]], Any]) -> float | None:
    """The median over rounds of key(a) / key(b); None when either way failed."""
    values = [key(r[a]) / key(r[b]) for r in rounds if a in r and b in r and key(r[a]) and key(r[b])]
    return round(statistics.median(values), 2) if values and len(values) == len(rounds) else None


def summary(rounds: list[dict[str, Any]], errors: dict[str, str]) -> dict[str, Any]:
    names = sorted({name for r in rounds for name in r} | set(errors))
    medians: dict[str, Any] = {}
    for name in names:
        done = [r[name] for r in rounds if name in r]
        if name in errors or not done:
            medians[name] = {"error": errors.get(name, "not measured")}
            continue
        tests = done[0]["redis"]
        medians[name] = {
            "redis_rps": {test: round(statistics.median(d["redis"][test] for d in done)) for test in tests},
            "bulk_bytes_per_s": round(statistics.median(d["bulk"] for d in done)),
        }
    tests = next((m["redis_rps"] for m in medians.values() if "redis_rps" in m), {})
    redis = {
        test: median_ratio(rounds, "through_sidecars", "nginx_stream", lambda row, t=test: row["redis"][t])
        for test in tests
    }
    found = [value for value in redis.values() if value is not None]
    return {
        "ways": medians,
        "ratios": {
            "redis_vs_nginx": redis,
            "redis_vs_nginx_min": min(found) if found and len(found) == len(redis) else None,
            "bulk_vs_nginx": median_ratio(rounds, "through_sidecars", "nginx_stream", lambda row: row["bulk"]),
            "nginx_vs_direct_bulk": median_ratio(rounds, "nginx_stream", "direct", lambda row: row["bulk"]),
            "targets": TARGETS,
        },
    }


def bench(workdir: Path, pinning: Pinning) -> dict[str, Any]:
    docker("network", "create", "--label", f"minimesh.bench={TAG}", NETWORK)
    plain_server, plain_client = start_pair("plain", pinning, in_mesh=False)
    _, mesh_client = start_pair("mesh", pinning, in_mesh=True)
    say("==> nginx stream beside the plain client and server (one in each network namespace)")
    nginx_pair(plain_server, plain_client, pinning)
    say("==> minimesh up (netns capture) for the mesh client and server")
    prefix = ("taskset", "-c", str(pinning.server)) if pinning.server is not None else ()
    daemon = Daemon(workdir, MESH, prefix)
    ways = [
        Way("direct", plain_client, "plain-server", REDIS_PORT, BULK_PORT),
        Way("nginx_stream", plain_client, "127.0.0.1", NGINX_REDIS, NGINX_BULK),
        Way("through_sidecars", mesh_client, "mesh-server", REDIS_PORT, BULK_PORT),
    ]
    errors: dict[str, str] = {}
    rounds: list[dict[str, Any]] = []
    try:
        daemon.wait(lambda: daemon.captured() >= 2, 30, "the mesh client and server to be captured")
        for way in ways:
            answer = ping(way.client, way.host, way.redis_port)
            if answer != "PONG":
                errors[way.name] = f"redis-cli PING got {answer[-200:]!r}"
        for number in range(1, ROUNDS + 1):
            say(f"==> round {number}/{ROUNDS}: redis-benchmark -t ping,set,get -n {REQUESTS} -c {CLIENTS}, "
                f"bulk {BULK_BYTES >> 20} MiB; {', '.join(w.name for w in ways if w.name not in errors)}")  # fmt: skip
            row: dict[str, Any] = {}
            for way in (w for w in ways if w.name not in errors):
                redis, bulk = redis_rps(way), bulk_bytes_per_s(way)
                if isinstance(redis, str) or isinstance(bulk, str):
                    errors[way.name] = redis if isinstance(redis, str) else str(bulk)
                else:
                    row[way.name] = {"redis": redis, "bulk": bulk}
            rounds.append(row)
    finally:
        daemon.stop()
    data = summary(rounds, errors)
    data["pinning"] = pinning.describe() if pinning.pinned else "not pinned"
    return data


def report(data: dict[str, Any]) -> str:
    if "unavailable" in data:
        return f"\nTCP through sidecars: not measured: {data['unavailable']}"
    load = f"redis-benchmark -c {CLIENTS}, bulk {BULK_BYTES >> 20} MiB; medians of {ROUNDS} rounds"
    lines = ["", f"TCP, client container → server container ({load}):"]
    for name, way in data.get("ways", {}).items():
        if "error" in way:
            lines.append(f"  {name:<17} failed: {way['error']}")
            continue
        redis = ", ".join(f"{test} {rps:,}/s" for test, rps in way["redis_rps"].items())
        lines.append(f"  {name:<17} {redis}; bulk {way['bulk_bytes_per_s'] / 1e6:,.0f} MB/s")
    found = data.get("ratios")
    if found:
        verdict = dict.fromkeys(TARGETS, "not measured")
        if found["redis_vs_nginx_min"] is not None:
            verdict["redis"] = "meets" if found["redis_vs_nginx_min"] >= TARGETS["redis"] else "under"
        if found["bulk_vs_nginx"] is not None:
            verdict["bulk"] = "meets" if found["bulk_vs_nginx"] >= TARGETS["bulk"] else "under"
        lines.append(f"  sidecars / nginx stream: redis {found['redis_vs_nginx_min']} (lowest of the tests; target "
                     f">= {TARGETS['redis']}: {verdict['redis']}), bulk {found['bulk_vs_nginx']} (target >= "
                     f"{TARGETS['bulk']}: {verdict['bulk']})")  # fmt: skip
    if data.get("error"):
        lines.append(f"  (stopped early: {data['error']})")
    return "\n".join(lines)


def _tcp_bench(workdir: Path, data: dict[str, Any]) -> None:
    ensure_images(TOOLS)
    data.update(bench(workdir, Pinning.detect()))


def main() -> int:
    data = bounded("TCP", _tcp_bench)
    print(report(data))
    record("tcp", data)
    failed = data.get("error") or any(key.endswith("_error") for row in data.get("rows", {}).values() for key in row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
