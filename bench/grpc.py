"""The gRPC part of `make bench` (DESIGN §5): unary calls with h2load from a client container
to a server container, five ways: direct; one hop, nginx `grpc_pass` in the server's network
namespace against minimesh's inbound sidecar (the client outside the mesh); two hops, nginx
`grpc_pass` beside the client and beside the server against the client and server sidecars
(each unary call is one HTTP/2 stream, so that row is streams/s through the pair).

The server is nginx answering every call with a canned gRPC reply (a 16-byte message, then
trailers `grpc-status: 0`) over HTTP/2 cleartext: the proxies are measured, not a Python
gRPC server. Each way is first checked with a real grpcio call (minimesh/grpc:local).
Closed loop: requests/s, medians of ROUNDS rounds with the ways side by side, ratios the
median of per-round ratios. Open loop: OPEN_RATE calls/s, P90 from h2load's per-request log
(from each request's actual send), added over direct, per hop. Between the two, py-spy
samples the daemon's native stacks during one more one-hop run: the h2 library's share of
its CPU, and so the most one hop could reach were the rest of the proxy free. Last, the h2
library's own work per call is timed in this process on the proxies' core
(bench/h2codec.py) and set beside the time a whole call may take at the target. Merges into
bench/results.json under "grpc"; prints a table.

h2load runs on the host inside the client container's network namespace (nsenter), so that
container's capture applies to it, and addresses the servers by IP (the host's resolver does
not know the network's aliases). The output says which protocol the daemon's metrics show
for the sidecar rows (gRPC, proxied per call over HTTP/2). Needs root, a Docker Engine and h2load (installed
with apt-get when missing); pinned like bench/tcp.py (proxies on one core, everything else on
the other); every container and the network are removed at the end, even when stopped.
"""

from __future__ import annotations

import collections
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker import TAG, Daemon, bounded, docker, ensure_images, record, say
from h2codec import MESSAGE as REQUEST
from h2codec import METHOD, codec_us_per_call
from procs import Pinning, ensure_h2load
from profiling import py_spy, spy, stacks
from tcp import NETWORK, TOOLS, median_ratio, run

GRPC_IMAGE = "minimesh/grpc:local"
PORT, NGINX_NEAR_SERVER, NGINX_NEAR_CLIENT = 50051, 50052, 50053
MESSAGE = "greeter-bench-ok"
FRAME = "\\000\\000\\000\\000\\020"
"""A gRPC message's 5-byte prefix (not compressed, 16 bytes long), as printf octal escapes."""
CONNECTIONS, STREAMS = 16, 8
"""h2load -c and -m in the closed loop: 128 calls in flight."""
SECONDS, WARMUP, ROUNDS = 5, 1, 3
OPEN_RATE, OPEN_CLIENTS, OPEN_SECONDS = 500, 5, 6
PROFILE_SECONDS = 3
"""py-spy samples 3 s from 1.5 s into one closed-loop run of 6 s (the rest is attaching)."""
H2_LIBRARY = re.compile(r"[(/](h2|hpack|hyperframe)/\w+\.py:")
"""A frame in the h2 library's modules (h2 and the HPACK and frame codecs it uses), as py-spy
names it: `receive_data (h2/connection.py:1501)`."""
TARGETS = {"one_hop_vs_nginx": 0.4, "added_p90_ms_per_hop": 0.3}

MESH = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-server}
spec:
  host: mesh-server
"""

NGINX = """\
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
{body}
}}
"""

CANNED = """\
    server {{
        listen {port} http2 reuseport backlog=4096;
        location / {{
            mirror /read-body;
            mirror_request_body on;
            root /tmp/grpc;
            default_type application/grpc;
            rewrite ^ /reply break;
            error_page 405 =200 /reply;
            add_trailer grpc-status 0;
        }}
        location = /read-body {{ internal; return 204; }}
    }}
"""
"""Every POST (any path) answered 200 with the file /tmp/grpc/reply (the static module
refuses POST with 405; error_page turns that into the file) and a grpc-status trailer. The
mirror makes nginx read the whole request first: answering before the request's last DATA
frame makes it reset the stream, which nginx's own grpc_pass reports as "upstream sent frame
for unknown stream" and a 502."""

GRPC_PASS = """\
    upstream next {{ server {upstream}; keepalive 256; keepalive_requests 1000000; keepalive_timeout 300s; }}
    server {{
        listen {listen} http2 reuseport backlog=4096;
        location / {{ grpc_pass grpc://next; }}
    }}
"""

CHECK = """
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    call = channel.unary_unary(sys.argv[2])
    try:
        print(call(b"greeter-bench-rq", timeout=10).decode(errors="replace"))
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}")
"""
"""One real grpcio call; prints the reply message or the gRPC status."""


@dataclass(frozen=True, slots=True)
class Way:
    """One way from a client container to the canned server."""

    name: str
    client: str
    target: str
    """host:port as the client container reaches it."""


def nginx_shell(config: str, reply: bool = False) -> list[str]:
    """sh -c arguments writing `config` (and the canned reply file) and running nginx in the foreground."""
    script = 'printf "%s" "$0" > /tmp/nginx.conf && exec nginx -c /tmp/nginx.conf'
    if reply:
        script = f'mkdir -p /tmp/grpc && printf "{FRAME}{MESSAGE}" > /tmp/grpc/reply && {script}'
    return ["sh", "-c", script, config]


def address(container: str) -> str:
    return docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}', container)


def start(pinning: Pinning) -> dict[str, str]:
    """The servers, clients and nginx proxies; name → container."""
    canned = nginx_shell(NGINX.format(body=CANNED.format(port=PORT)), reply=True)
    mesh_server = ["--label", "minimesh.service=mesh-server", "--label", f"minimesh.port=grpc:{PORT}"]
    mesh_client = ["--label", "minimesh.service=mesh-client", "--label", "minimesh.port=http:80"]
    run("plain-server", TOOLS, *canned, core=pinning.load)
    run("mesh-server", *mesh_server, TOOLS, *canned, core=pinning.load)
    run("plain-client", TOOLS, "sleep", "infinity", core=pinning.load)
    run("mesh-client", *mesh_client, TOOLS, "sleep", "infinity", core=pinning.load)
    names = {name: f"{TAG}-{name}" for name in ("plain-server", "mesh-server", "plain-client", "mesh-client")}
    near_server = GRPC_PASS.format(upstream=f"127.0.0.1:{PORT}", listen=NGINX_NEAR_SERVER)
    near_client = GRPC_PASS.format(
        upstream=f"{address(names['plain-server'])}:{NGINX_NEAR_SERVER}", listen=f"127.0.0.1:{NGINX_NEAR_CLIENT}"
    )
    run("nginx-server", TOOLS, *nginx_shell(NGINX.format(body=near_server)),
        network=f"container:{names['plain-server']}", core=pinning.server)  # fmt: skip
    run("nginx-client", TOOLS, *nginx_shell(NGINX.format(body=near_client)),
        network=f"container:{names['plain-client']}", core=pinning.server)  # fmt: skip
    return names


def grpc_check(way: Way) -> str:
    """The canned message if a grpcio call the way goes answers, else what it got."""
    command = ["docker", "run", "--rm", "--network", f"container:{way.client}", GRPC_IMAGE, "python", "-c", CHECK,
               way.target, METHOD]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return (done.stdout + done.stderr).strip()


def wait_answering(way: Way, seconds: float = 30) -> str | None:
    """None once a grpcio call the way goes gets the canned reply; else the last answer."""
    deadline = time.monotonic() + seconds
    while (answer := grpc_check(way)) != MESSAGE:
        if time.monotonic() > deadline:
            return f"a grpcio call got {answer[-300:]!r}"
        time.sleep(0.5)
    return None


class H2load:
    """h2load in a container's network namespace, pinned to the load core."""

    def __init__(self, workdir: Path, pinning: Pinning) -> None:
        """`workdir`: a folder of its own, not the one the daemon watches, so that writing
        its logs wakes nothing in the daemon."""
        workdir.mkdir(exist_ok=True)
        self.request = workdir / "request"
        self.request.write_bytes(REQUEST)
        self.workdir = workdir
        self.pinning = pinning

    def _run(self, way: Way, *args: str) -> str:
        pid = docker("inspect", "-f", "{{.State.Pid}}", way.client)
        command = ["nsenter", f"--net=/proc/{pid}/ns/net", "h2load", "-d", str(self.request),
                   "-H", "content-type: application/grpc", "-H", "te: trailers", *args,
                   f"http://{way.target}{METHOD}"]  # fmt: skip
        done = subprocess.run(self.pinning.load_cmd(command), capture_output=True, text=True, timeout=120, check=False)
        return done.stdout + done.stderr

    def closed(self, way: Way) -> float | str:
        """Calls/s at CONNECTIONS times STREAMS in flight, or what went wrong."""
        out = self._run(way, "-c", str(CONNECTIONS), "-m", str(STREAMS), "-D", str(SECONDS),
                        "--warm-up-time", str(WARMUP))  # fmt: skip
        found = re.search(r"finished in \S+, ([\d.]+) req/s", out)
        return failure(out) or (float(found.group(1)) if found else f"h2load: {out[-300:]!r}")

    def open(self, way: Way) -> dict[str, float] | str:
        """p50/p90/p99 in ms at OPEN_RATE calls/s (each call timed from its send), or what went wrong."""
        log = self.workdir / f"{way.name}.log"
        out = self._run(way, "-c", str(OPEN_CLIENTS), "-m", "10", "--rps", str(OPEN_RATE // OPEN_CLIENTS),
                        "-D", str(OPEN_SECONDS), "--warm-up-time", str(WARMUP), "--log-file", str(log))  # fmt: skip
        problem = failure(out)
        if problem:
            return problem
        times = sorted(
            int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.count("\t") >= 2
        )
        if not times:
            return "h2load logged no request"
        pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 3)  # noqa: E731
        return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "calls": len(times)}


def failure(out: str) -> str | None:
    """None when h2load finished with every call answered 2xx, else its summary lines."""
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored, "
                       r"(\d+) timeout", out)  # fmt: skip
    codes = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if counts and codes and "req/s" in out:
        done, *failed = (int(n) for n in counts.groups())
        if done and not sum(failed) and not sum(int(n) for n in codes.groups()):
            return None
    lines = [line for line in out.splitlines() if line.startswith(("requests:", "status codes:"))]
    return "h2load: " + (" ".join(lines) or out[-300:])


def nginx_said() -> str:
    """The last lines each nginx proxy logged (its errors: the access log is off)."""
    said = []
    for name in ("nginx-server", "nginx-client"):
        done = subprocess.run(["docker", "logs", "--tail", "2", f"{TAG}-{name}"], capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
        said.append(f"{name}: " + " | ".join((done.stdout + done.stderr).strip().splitlines()))
    return "; ".join(said)


def mesh_protocol(daemon: Daemon) -> str:
    """How the daemon's metrics saw the calls to mesh-server: gRPC requests or TCP connections."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    calls = [line for line in text.splitlines() if line.startswith("istio_requests_total{") and "mesh-server" in line]
    if any('request_protocol="grpc"' in line for line in calls):
        bad: collections.Counter[str] = collections.Counter()
        for line in calls:
            if 'grpc_response_status="0"' not in line:
                labels = dict(
                    re.findall(r'(response_code|grpc_response_status|response_flags|reporter)="([^"]*)"', line)
                )
                bad[" ".join(f"{name}={value!r}" for name, value in sorted(labels.items()))] += float(
                    line.rsplit(" ", 1)[1]
                )
        which = "; ".join(f"{count:g} with {labels}" for labels, count in bad.most_common())
        return (
            f"HTTP/2, gRPC (istio_requests_total; {sum(bad.values()):g} calls with a grpc-status other than 0: {which})"
        )
    if any(
        line.startswith("istio_tcp_connections_opened_total{") and "mesh-server" in line for line in text.splitlines()
    ):
        return "TCP pass-through (port declared grpc, no HTTP/2 upstream yet)"
    return "not seen in the metrics"


def h2_share(daemon: Daemon, h2load: H2load, way: Way, pinning: Pinning, out: Path) -> dict[str, Any] | str:
    """The h2 library's share of the daemon's event-loop CPU while `way` runs at saturation,
    from py-spy's native stacks (which see into minimesh's compiled modules; see `_charged`).
    Or what went wrong."""
    binary = py_spy()
    if binary is None:
        return "py-spy not found: .venv/bin/pip install py-spy"
    loaded: list[float | str] = []
    load = threading.Thread(target=lambda: loaded.append(h2load.closed(way)))
    load.start()
    try:
        time.sleep(WARMUP + 0.5)
        problem = spy(binary, daemon.process.pid, PROFILE_SECONDS, out, pinning, "--native")
    finally:
        load.join()
    if not loaded or isinstance(loaded[0], str):
        return f"the load failed: {loaded[0] if loaded else 'h2load raised'}"
    if problem is not None:
        return problem
    counts: collections.Counter[str] = collections.Counter()
    for frames, count in stacks(out):
        if any(frame.startswith("<module>") for frame in frames):
            counts[_charged(frames)] += count
    samples = counts.total()
    if not samples:
        return "py-spy took no sample of the event loop"
    return {"h2_share": round(counts["h2"] / samples, 3), "samples": samples}


def _charged(frames: list[str]) -> str:
    """What one event-loop sample is charged to, by its innermost frame below the loop's
    `run_forever` that is in the h2 library (`h2`) or in minimesh (`minimesh`): the standard
    library and the C they call are theirs. Anything else is the event loop's own work,
    waiting in epoll included (`loop`), so the h2 share is never overstated."""
    below = frames[max((i for i, frame in enumerate(frames) if "run_forever" in frame), default=-1) + 1 :]
    for frame in reversed(below):
        if H2_LIBRARY.search(frame):
            return "h2"
        if "CPyDef_" in frame or "minimesh/" in frame:
            return "minimesh"
    return "loop"


def bench(workdir: Path, pinning: Pinning) -> dict[str, Any]:
    docker("network", "create", "--label", f"minimesh.bench={TAG}", NETWORK)
    names = start(pinning)
    plain, mesh = names["plain-client"], names["mesh-client"]
    ways = [
        Way("direct", plain, f"{address(names['plain-server'])}:{PORT}"),
        Way("nginx_one_hop", plain, f"{address(names['plain-server'])}:{NGINX_NEAR_SERVER}"),
        Way("sidecar_one_hop", plain, f"{address(names['mesh-server'])}:{PORT}"),
        Way("nginx_two_hops", plain, f"127.0.0.1:{NGINX_NEAR_CLIENT}"),
        Way("sidecar_pair", mesh, f"{address(names['mesh-server'])}:{PORT}"),
    ]
    say("==> minimesh up (netns capture) for the mesh client and server")
    prefix = ("taskset", "-c", str(pinning.server)) if pinning.server is not None else ()
    daemon = Daemon(workdir, MESH, prefix)
    h2load = H2load(workdir / "h2load", pinning)
    errors: dict[str, str] = {}
    rounds: list[dict[str, Any]] = []
    latency: dict[str, Any] = {}
    profile: dict[str, Any] | str = "sidecar_one_hop not measured"
    try:
        daemon.wait(lambda: daemon.captured() >= 2, 30, "the mesh client and server to be captured")
        for way in ways:
            problem = wait_answering(way)
            if problem:
                errors[way.name] = problem
        live = [way for way in ways if way.name not in errors]
        for number in range(1, ROUNDS + 1):
            say(f"==> round {number}/{ROUNDS}: h2load -c {CONNECTIONS} -m {STREAMS} -D {SECONDS}; "
                f"{', '.join(way.name for way in live if way.name not in errors)}")  # fmt: skip
            row: dict[str, Any] = {}
            for way in (w for w in live if w.name not in errors):
                rps = h2load.closed(way)
                if isinstance(rps, str):
                    errors[way.name] = rps + (f"; nginx said: {nginx_said()}" if way.name.startswith("nginx") else "")
                else:
                    row[way.name] = {"rps": rps}
            rounds.append(row)
        one_hop = next((way for way in live if way.name == "sidecar_one_hop" and way.name not in errors), None)
        if one_hop is not None:
            say(f"==> py-spy --native on the daemon for {PROFILE_SECONDS} s of sidecar_one_hop at saturation")
            profile = h2_share(daemon, h2load, one_hop, pinning, workdir / "h2load" / "one-hop-stacks.txt")
        say(f"==> open loop: {OPEN_RATE} calls/s for {OPEN_SECONDS} s each")
        for way in (w for w in live if w.name not in errors):
            measured = h2load.open(way)
            latency[way.name] = {"error": measured} if isinstance(measured, str) else measured
        path = mesh_protocol(daemon)
    finally:
        daemon.stop()
    return summary(rounds, errors, latency) | {"mesh_path": path, "pinning": pinning.describe(), "profile": profile}


def summary(rounds: list[dict[str, Any]], errors: dict[str, str], latency: dict[str, Any]) -> dict[str, Any]:
    names = list(dict.fromkeys([*(n for r in rounds for n in r), *errors]))
    ways = {
        name: {"error": errors[name]}
        if name in errors
        else {"rps": round(statistics.median(r[name]["rps"] for r in rounds))}
        for name in names
    }

    def rps_ratio(a: str, b: str) -> float | None:
        return median_ratio(rounds, a, b, lambda row: row["rps"])

    def added(name: str, hops: int) -> float | None:
        way, direct = latency.get(name, {}), latency.get("direct", {})
        return round((way["p90"] - direct["p90"]) / hops, 3) if "p90" in way and "p90" in direct else None

    return {
        "ways": ways,
        "open_loop": latency,
        "ratios": {
            "one_hop_vs_nginx": rps_ratio("sidecar_one_hop", "nginx_one_hop"),
            "pair_vs_nginx_two_hops": rps_ratio("sidecar_pair", "nginx_two_hops"),
            "one_hop_vs_direct": rps_ratio("sidecar_one_hop", "direct"),
            "nginx_one_hop_vs_direct": rps_ratio("nginx_one_hop", "direct"),
            "added_p90_ms_per_hop": {
                "sidecar_one_hop": added("sidecar_one_hop", 1),
                "sidecar_pair": added("sidecar_pair", 2),
                "nginx_one_hop": added("nginx_one_hop", 1),
                "nginx_two_hops": added("nginx_two_hops", 2),
            },
            "targets": TARGETS,
        },
        "settings": f"h2load -c {CONNECTIONS} -m {STREAMS}, {WARMUP} s warm-up + {SECONDS} s, {ROUNDS} rounds; "
        f"open loop {OPEN_RATE} calls/s over {OPEN_CLIENTS} connections for {OPEN_SECONDS} s; "
        f"upstream nginx with a canned {len(MESSAGE)}-byte gRPC reply",
    }


def report(data: dict[str, Any]) -> str:
    if "unavailable" in data:
        return f"\ngRPC unary: not measured: {data['unavailable']}"
    lines = ["", f"gRPC unary, client container → server container ({data.get('settings', '')}):"]
    for name, way in data.get("ways", {}).items():
        opened = data.get("open_loop", {}).get(name, {})
        latency = (f"  p50 {opened['p50']:.2f} ms  p90 {opened['p90']:.2f} ms  p99 {opened['p99']:.2f} ms"
                   if "p90" in opened else f"  open loop: {opened['error']}" if "error" in opened else "")  # fmt: skip
        lines.append(
            f"  {name:<16} " + (f"failed: {way['error']}" if "error" in way else f"{way['rps']:>7,} calls/s{latency}")
        )
    found = data.get("ratios")
    if found:
        one, per_hop = found["one_hop_vs_nginx"], found["added_p90_ms_per_hop"]["sidecar_one_hop"]
        verdict = "not measured" if one is None else "meets" if one >= TARGETS["one_hop_vs_nginx"] else "under"
        p90 = "not measured" if per_hop is None else "meets" if per_hop <= TARGETS["added_p90_ms_per_hop"] else "over"
        lines.append(f"  one hop / nginx grpc_pass: {one} (target >= {TARGETS['one_hop_vs_nginx']}: {verdict}); "
                     f"sidecar pair / two nginx: {found['pair_vs_nginx_two_hops']}")  # fmt: skip
        added = found["added_p90_ms_per_hop"]
        lines.append(f"  added P90 per hop at {OPEN_RATE} calls/s: sidecar {per_hop} ms (target <= "
                     f"{TARGETS['added_p90_ms_per_hop']}: {p90}), pair {added['sidecar_pair']} ms per hop, "
                     f"nginx {added['nginx_one_hop']} ms")  # fmt: skip
    codec, nginx = data.get("h2_codec_us_per_call"), data.get("ways", {}).get("nginx_one_hop", {}).get("rps")
    if codec and nginx:
        budget = 1e6 / (TARGETS["one_hop_vs_nginx"] * nginx)
        lines.append(f"  the h2 library's own work per proxied call: {codec:.0f} us, {codec / budget:.0%} of the "
                     f"{budget:.0f} us a whole call may take at {TARGETS['one_hop_vs_nginx']}x nginx")  # fmt: skip
    profile, one = data.get("profile"), (found or {}).get("one_hop_vs_nginx")
    if isinstance(profile, dict) and one and profile["h2_share"]:
        share = profile["h2_share"]
        lines.append(f"  the h2 library's share of the daemon's event-loop CPU at saturation: {share:.0%} "
                     f"({profile['samples']} py-spy samples); were the rest free, one hop would reach "
                     f"{one / share:.2f}x nginx at most")  # fmt: skip
    elif isinstance(profile, str):
        lines.append(f"  the h2 library's share of the daemon's CPU: not measured: {profile}")
    if data.get("mesh_path"):
        lines.append(f"  the sidecars carried the calls as: {data['mesh_path']}")
    if data.get("error"):
        lines.append(f"  (stopped early: {data['error']})")
    return "\n".join(lines)


def _grpc_bench(workdir: Path, data: dict[str, Any]) -> None:
    if not ensure_h2load(say):
        raise RuntimeError("h2load not found: apt-get install -y nghttp2-client")
    ensure_images(TOOLS, GRPC_IMAGE)
    pinning = Pinning.detect()
    data.update(bench(workdir, pinning))
    say("==> the h2 library's own work per call, in this process, on the proxies' core")
    data["h2_codec_us_per_call"] = pinning.on_server(codec_us_per_call)


def main() -> int:
    data = bounded("gRPC", _grpc_bench)
    print(report(data))
    record("grpc", data)
    return 1 if data.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
