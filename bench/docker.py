"""The Docker part of `make bench`: a client container calling a server container directly,
then through both sidecars (netns capture), and the daemon's memory with 1, 10 and 50
injected containers. Merges its figures into bench/results.json and prints a table.

Needs root and a Docker Engine (it says why it measured nothing otherwise); creates only
containers and one network of its own, labelled, and removes them all, even when stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results.json"
IMAGE = "minimesh/bookinfo:local"
SLEEPER = "minimesh/debian-base:bookworm"
TAG = f"mmbench{os.getpid()}"
CLIENT_SECONDS = 8
CLIENT_CONNECTIONS = 16
COUNTS = (1, 10, 50)
BUDGET = 300

CLIENT = """
import asyncio, json, sys, time
import aiohttp
URL, SECONDS, CONNS = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
async def main():
    await asyncio.sleep(2)  # let the daemon capture this container first (the start-up race)
    latencies = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNS)) as session:
        for _ in range(50):
            async with session.get(URL) as r:
                await r.read()
        deadline = time.monotonic() + SECONDS
        async def worker():
            nonlocal errors
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                try:
                    async with session.get(URL) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - sent)
        await asyncio.gather(*(worker() for _ in range(CONNS)))
    latencies.sort()
    pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)
    print(json.dumps({"rps": round(len(latencies) / SECONDS), "p50": pick(0.5), "p90": pick(0.9),
                      "p99": pick(0.99), "errors": errors}))
asyncio.run(main())
"""

MESH = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings, subset: v1}}]
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def unavailable() -> str:
    if os.geteuid() != 0:
        return "not root (netns capture needs root)"
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        return "no Docker Engine answers"
    return ""


def ensure_images(*images: str) -> None:
    if all(docker("images", "-q", image) for image in images or (IMAGE, SLEEPER)):
        return
    say("==> building the images first (make images)")
    subprocess.run(["bash", "compose/images.sh"], cwd=ROOT, check=True)


class Daemon:
    """`minimesh up --capture netns` watching only this bench's containers, serving `mesh`;
    `prefix` goes before the command (taskset, to pin it to a core)."""

    def __init__(self, workdir: Path, mesh: str = MESH, prefix: tuple[str, ...] = ()) -> None:
        (workdir / "mesh.yaml").write_text(mesh)
        self.admin = 15999
        self.log = (workdir / "daemon.log").open("w")
        command = [*prefix, str(ROOT / ".venv" / "bin" / "minimesh"), "up", "--capture", "netns", "-f", str(workdir),
                   "--gateway-port", "18999", "--admin-port", str(self.admin), "--docker-label",
                   f"minimesh.bench={TAG}"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.wait(lambda: self.get("/ready") is not None, 30, "the daemon to be ready")

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=2) as response:
                return json.loads(response.read()) if path != "/ready" else True
        except OSError:
            return None

    def captured(self) -> int:
        dump = self.get("/config_dump") or {}
        return sum(1 for listener in dump.get("listeners", []) if listener.get("kind") == "inbound")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def wait(self, check: Any, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"waiting for {what} failed")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def run_client(network: str) -> dict[str, Any]:
    out = docker("run", "--rm", "--network", network, "--label", f"minimesh.bench={TAG}",
                 "--label", "minimesh.service=bench-client", "--label", "minimesh.port=http:9080",
                 "--label", "app=bench-client", IMAGE, "python", "-c", CLIENT,
                 "http://ratings:9080/ratings/0", str(CLIENT_SECONDS), str(CLIENT_CONNECTIONS))  # fmt: skip
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def path_bench(workdir: Path) -> dict[str, Any]:
    network = f"{TAG}-net"
    docker("network", "create", "--label", f"minimesh.bench={TAG}", network)
    docker("run", "-d", "--name", f"{TAG}-ratings", "--network", network, "--network-alias", "ratings",
           "--label", f"minimesh.bench={TAG}", "--label", "minimesh.service=ratings", "--label", "app=ratings",
           "--label", "version=v1", IMAGE, "python", "ratings.py")  # fmt: skip
    time.sleep(2)
    say(f"==> client container → server container, direct ({CLIENT_SECONDS} s, {CLIENT_CONNECTIONS} connections)")
    direct = run_client(network)
    daemon = Daemon(workdir)
    try:
        daemon.wait(lambda: daemon.captured() >= 1, 30, "the server container to be captured")
        say("==> client container → its sidecar → server sidecar → app (netns capture)")
        meshed = run_client(network)
    finally:
        daemon.stop()
    return {
        "direct": direct,
        "through_sidecars": meshed,
        "throughput_ratio": round(meshed["rps"] / direct["rps"], 2) if direct["rps"] else None,
        "added_p90_ms": round(meshed["p90"] - direct["p90"], 3),
        "note": "client and load in one container (aiohttp, closed loop); plaintext between sidecars (no mTLS yet)",
    }


def memory_bench(workdir: Path) -> dict[str, Any]:
    network = f"{TAG}-net"
    daemon = Daemon(workdir)
    rss: dict[str, float] = {}
    try:
        rss["0"] = round(daemon.rss_mb(), 1)
        started = 0
        for count in COUNTS:
            for i in range(started, count):
                docker("run", "-d", "--name", f"{TAG}-sleeper-{i}", "--network", network,
                       "--label", f"minimesh.bench={TAG}", "--label", f"minimesh.service=sleeper-{i}",
                       "--label", "minimesh.port=http:9080", SLEEPER, "sleep", "infinity")  # fmt: skip
            started = count
            daemon.wait(lambda c=count: daemon.captured() >= c, 120, f"{count} captured containers")
            time.sleep(2)
            rss[str(count)] = round(daemon.rss_mb(), 1)
            say(f"==> {count} injected containers: daemon RSS {rss[str(count)]} MB")
    finally:
        daemon.stop()
    per = (rss[str(COUNTS[-1])] - rss[str(COUNTS[0])]) / (COUNTS[-1] - COUNTS[0])
    return {"rss_mb": rss, "mb_per_workload": round(per, 3), "target_mb_per_workload": 1.0}


def cleanup() -> None:
    ids = docker("ps", "-aq", "--filter", f"label=minimesh.bench={TAG}", check=False).split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    docker("network", "rm", f"{TAG}-net", check=False)


def report(data: dict[str, Any]) -> str:
    if "unavailable" in data:
        return f"\nDocker path and memory: not measured: {data['unavailable']}"
    lines = ["", "Docker path (container → container, aiohttp client in a container, closed loop):"]
    path = data.get("path")
    if path:
        for name in ("direct", "through_sidecars"):
            row = path[name]
            lines.append(f"  {name:<18} {row['rps']:>7,} req/s  p50 {row['p50']:.2f} ms  p90 {row['p90']:.2f} ms  "
                         f"p99 {row['p99']:.2f} ms  errors {row['errors']}")  # fmt: skip
        lines.append(f"  through sidecars / direct: {path['throughput_ratio']}  added p90 {path['added_p90_ms']} ms")
    memory = data.get("memory")
    if memory:
        counts = ", ".join(f"{k} → {v} MB" for k, v in memory["rss_mb"].items())
        verdict = "meets" if memory["mb_per_workload"] <= memory["target_mb_per_workload"] else "over"
        lines.append(f"daemon RSS by injected containers: {counts}")
        lines.append(f"  {memory['mb_per_workload']} MB per extra workload (target <= 1 MB: {verdict})")
    if data.get("error"):
        lines.append(f"  (stopped early: {data['error']})")
    return "\n".join(lines)


def bounded(label: str, work: Callable[[Path, dict[str, Any]], None]) -> dict[str, Any]:
    """Run `work` (filling the data it is given) in a scratch folder within BUDGET seconds:
    the data, with the error that stopped it if one did; every container, network and
    folder it made is removed whatever happened."""
    reason = unavailable()
    if reason:
        return {"unavailable": reason}

    def out_of_time(signum: int, frame: object) -> None:
        raise TimeoutError(f"the {label} bench took longer than {BUDGET} s")

    data: dict[str, Any] = {}
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(BUDGET)
    workdir = Path(tempfile.mkdtemp(prefix=f"minimesh-bench-{label.lower()}-"))
    try:
        work(workdir, data)
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        data["error"] = str(exc)
    finally:
        signal.alarm(0)
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return data


def record(key: str, data: dict[str, Any]) -> None:
    """Keep `data` under `key` in bench/results.json, beside the other benches' results."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = data
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def _docker_bench(workdir: Path, data: dict[str, Any]) -> None:
    ensure_images()
    data["path"] = path_bench(workdir)
    data["memory"] = memory_bench(workdir)


def main() -> int:
    data = bounded("Docker", _docker_bench)
    print(report(data))
    record("docker", data)
    return 1 if data.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
