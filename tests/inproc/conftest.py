"""Helpers of the in-process tests: free loopback ports, small upstreams, and `minimesh up`
run as a user runs it (a subprocess), stopped at the end of each test."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import aiohttp
import pytest

from tests.inproc.upstreams import Backend, free_ports

READY_TIMEOUT = 60.0


def minimesh(*args: str, cwd: Path | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one `minimesh` command to completion, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "minimesh", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def refused(port: int) -> bool:
    """Is a connection to 127.0.0.1:`port` refused (nothing listens)?"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@dataclass
class Daemon:
    """A `minimesh up` subprocess: its ports, its stdout (the access log) and stderr (its log)."""

    process: subprocess.Popen[bytes]
    gateway_port: int
    admin_port: int
    out: Path
    err: Path
    extra_ports: list[int] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit code (killed and failed if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"minimesh up did not stop within {timeout} s of SIGTERM:\n{self.stderr()}")

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"minimesh up exited with {self.process.returncode}:\n{self.stderr()}")
                try:
                    async with session.get(f"{self.admin}/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        pytest.fail(f"minimesh up was not ready within {timeout} s:\n{self.stderr()}")

    async def config_dump(self, session: aiohttp.ClientSession) -> dict[str, object]:
        async with session.get(f"{self.admin}/config_dump") as response:
            assert response.status == 200
            dump: dict[str, object] = await response.json()
            return dump


StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start `minimesh up --no-docker -f PATH... ARGS` on free ports; every one is stopped after the test."""
    running: list[Daemon] = []

    async def start(*paths: Path, args: tuple[str, ...] = (), ready: bool = True) -> Daemon:
        gateway, admin = free_ports(2)
        number = len(running)
        out, err = tmp_path / f"daemon{number}.out", tmp_path / f"daemon{number}.err"
        files = [arg for path in paths for arg in ("-f", str(path))]
        command = [sys.executable, "-m", "minimesh", "up", "--no-docker", *files, "--gateway-port", str(gateway),
                   "--admin-port", str(admin), *args]  # fmt: skip
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd=tmp_path)
        daemon = Daemon(process, gateway, admin, out, err)
        running.append(daemon)
        if ready:
            await daemon.wait_ready()
        return daemon

    yield start
    for daemon in running:
        if daemon.process.poll() is None:
            daemon.stop()


StartUpstream = Callable[[str], Awaitable[Backend]]


@pytest.fixture
async def upstreams() -> AsyncIterator[StartUpstream]:
    """Start named upstreams on ephemeral 127.0.0.1 ports; all are closed after the test."""
    started: list[Backend] = []

    async def start(name: str) -> Backend:
        upstream = await Backend(name).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


MESH = Template("""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: $gateway}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: productpage}
spec: {selector: {app: productpage}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: reviews-v1
  annotations: {$reviews_annotations}
spec: {address: 127.0.0.1, ports: {http: $reviews_v1}, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2}
spec: {address: 127.0.0.1, ports: {http: $reviews_v2}, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: productpage-v1
  annotations: {$productpage_annotations}
spec: {address: 127.0.0.1, ports: {http: $productpage}, labels: {app: productpage, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: entry}
spec:
  hosts: ["*"]
  gateways: [$gateway]
  http:
  - name: reviews-entry
    match: [{uri: {prefix: /reviews}}]
    route: [{destination: {host: reviews, subset: $entry_subset, port: {number: 9080}}}]
  - match: [{uri: {prefix: /productpage}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
$extra""")


class Shop:
    """Three upstreams (reviews v1 and v2, productpage v1) and the mesh.yaml that names them."""

    def __init__(self, folder: Path, reviews_v1: int, reviews_v2: int, productpage: int, sidecar: int) -> None:
        self.folder = folder
        self.path = folder / "mesh.yaml"
        self.ports = {"reviews_v1": reviews_v1, "reviews_v2": reviews_v2, "productpage": productpage}
        self.sidecar = sidecar

    def text(self, *, gateway: str = "web", entry_subset: str = "v1", reviews_sidecar: int | None = None,
             productpage_sidecar: bool = True, extra: str = "") -> str:  # fmt: skip
        def annotations(port: int | None) -> str:
            return f'minimesh.sidecar-port: "{port}"' if port else ""

        return MESH.substitute(
            **self.ports,
            gateway=gateway,
            entry_subset=entry_subset,
            reviews_annotations=annotations(reviews_sidecar),
            productpage_annotations=annotations(self.sidecar if productpage_sidecar else None),
            extra=extra,
        )

    def write(self, text: str) -> None:
        """Replace the file whole (write aside, then rename), as most editors save."""
        aside = self.path.with_suffix(".tmp")
        aside.write_text(text)
        os.replace(aside, self.path)


@pytest.fixture
async def shop(tmp_path: Path, upstreams: StartUpstream) -> Shop:
    folder = tmp_path / "config"
    folder.mkdir()
    v1, v2, page = [await upstreams(name) for name in ("reviews-v1", "reviews-v2", "productpage-v1")]
    shop = Shop(folder, v1.port, v2.port, page.port, free_ports(1)[0])
    shop.write(shop.text())
    return shop
