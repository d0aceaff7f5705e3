"""Transparent capture inside a workload's network namespace, as istio-init does it.

One helper thread per namespace enters it once (setns through ctypes: Python 3.11 has no
`os.setns`) and makes sockets there on request; sockets keep the namespace they were made
in. The iptables rules send the app's outbound TCP to 15001 and its service ports to 15006;
connections the app opened before them are aborted so that it reopens them through the mesh.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
import queue
import shlex
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from minimesh.errors import MinimeshError

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
MESH_MARK = 0x539
"""SO_MARK of the mesh's own sockets made inside a namespace: the capture rules let them pass."""
OUTPUT_CHAIN = "MINIMESH_OUTPUT"
INBOUND_CHAIN = "MINIMESH_INBOUND"
SO_ORIGINAL_DST = 80
OWNER_PREFIX = "minimesh:"
CLONE_NEWNET = 0x40000000

log = logging.getLogger("minimesh.capture")

T = TypeVar("T")


class CaptureError(MinimeshError):
    """Capture could not be set up in a namespace (no root, no iptables, the container is gone)."""


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), path)
    finally:
        os.close(fd)


class Namespace:
    """A network namespace and the thread that lives in it, making sockets on request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future[object]] | None] = (
            queue.SimpleQueue()
        )
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=f"netns {path}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        try:
            self._ready.result(timeout=5)
        except (OSError, concurrent.futures.TimeoutError) as exc:
            raise CaptureError(f"cannot enter the network namespace {self.path}: {exc}; run minimesh as root") from exc

    def _run(self) -> None:
        try:
            _setns(self.path)
        except OSError as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while (job := self._jobs.get()) is not None:
            work, result = job
            try:
                result.set_result(work())
            except BaseException as exc:  # handed back to the caller, raised there
                result.set_exception(exc)

    async def call(self, work: Callable[[], T]) -> T:
        """Run `work` in the namespace (on its thread) and return what it returned."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((work, result))  # type: ignore[arg-type]
        return await asyncio.wrap_future(result)

    async def listen(self, port: int) -> socket.socket:
        """A listening socket on all addresses of the namespace."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(1024)
            sock.setblocking(False)
            return sock

        return await self.call(make)

    async def connect(self, host: str, port: int) -> socket.socket:
        """A socket connected from inside the namespace, marked so capture lets it pass."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MESH_MARK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            return sock

        sock = await self.call(make)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)

    def __repr__(self) -> str:
        state = "alive" if self._thread.is_alive() else "stopped"
        return f"<Namespace {self.path} {state}>"


def netns_unavailable() -> str:
    """Why netns capture cannot work here ("" when it can): it needs root, nsenter and iptables."""
    if os.geteuid() != 0:
        return "not root: netns capture needs root (sudo minimesh up)"
    for tool in ("nsenter", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return ""


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was headed (`SO_ORIGINAL_DST`)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(address), port


def capture_rules(inbound_ports: Iterable[int], owner: int | None = None) -> str:
    """istio-init's rules as an iptables-restore script: outbound TCP → 15001 except loopback
    and the mesh's marked sockets; inbound service ports → 15006. The jumps name the daemon
    (`owner`, its pid) so a later `minimesh down` can tell a dead daemon's rules."""
    tag = f' -m comment --comment "{OWNER_PREFIX}{owner if owner is not None else os.getpid()}"'
    lines = [
        "*nat",
        f":{OUTPUT_CHAIN} - [0:0]",
        f":{INBOUND_CHAIN} - [0:0]",
        f"-A OUTPUT -p tcp{tag} -j {OUTPUT_CHAIN}",
        f"-A {OUTPUT_CHAIN} -m mark --mark {MESH_MARK:#x} -j RETURN",
        f"-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN",
        f"-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
        f"-A PREROUTING -p tcp{tag} -j {INBOUND_CHAIN}",
    ]
    lines += [
        f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j REDIRECT --to-ports {INBOUND_PORT}" for port in inbound_ports
    ]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _iptables(path: str, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["nsenter", f"--net={path}", *args], input=stdin, text=True, capture_output=True, timeout=10, check=False
        )
    except FileNotFoundError as exc:
        raise CaptureError(f"{exc.filename} is not installed; install util-linux and iptables") from exc


def install_rules(path: str, inbound_ports: Iterable[int]) -> None:
    """Capture in the namespace at `path`; rules a crashed daemon left there are removed first."""
    remove_rules(path)
    result = _iptables(path, ["iptables-restore", "--wait", "--noflush"], capture_rules(inbound_ports))
    if result.returncode != 0:
        raise CaptureError(f"iptables-restore failed in {path}: {result.stderr.strip()}; run minimesh as root")


def bypass_filter(listening: Iterable[int], inbound_ports: Iterable[int]) -> str:
    """An `ss` filter for the connections that opened before the rules and so bypass the mesh:
    established, not loopback, not the mesh's own (marked), and either the app's outbound ones
    (their local port is no listening one) or inbound ones to a captured service port."""
    served = sorted((set(listening) | {OUTBOUND_PORT, INBOUND_PORT}) - set(inbound_ports))
    kept = "".join(f" and not sport = :{port}" for port in served)
    return f"not dst 127.0.0.0/8 and not dst [::1] and not fwmark = {MESH_MARK:#x}{kept}"


def listening_ports(ss_output: str) -> set[int]:
    """The local ports of `ss -Htln` lines (`LISTEN 0 4096 0.0.0.0:9080 0.0.0.0:*`)."""
    ports = set()
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
            ports.add(int(fields[3].rpartition(":")[2]))
    return ports


def abort_bypassing(path: str, inbound_ports: Iterable[int]) -> None:
    """Abort the connections the app opened before capture began (a keep-alive pool made at
    start-up would otherwise bypass the mesh for as long as it lives): the app sees them
    closed and opens new ones, which the rules now capture. istio-init never needs this, as
    it runs before the app; minimesh can capture a container that is already running."""
    listening = listening_ports(_iptables(path, ["ss", "-Htln"]).stdout)
    result = _iptables(path, ["ss", "-HKtn", "state", "established", bypass_filter(listening, inbound_ports)])
    if result.returncode != 0:
        log.debug("aborting connections opened before capture in %s: %s", path, result.stderr.strip())


def _jumps(path: str) -> list[str]:
    """Our jump rules in the namespace, as iptables-save prints them (`-A OUTPUT ... -j MINIMESH_…`)."""
    saved = _iptables(path, ["iptables-save", "-t", "nat"]).stdout
    hooks = ("-A OUTPUT ", "-A PREROUTING ")
    return [line for line in saved.splitlines() if (line.startswith(hooks) and f"-j {OUTPUT_CHAIN}" in line)
            or (line.startswith(hooks) and f"-j {INBOUND_CHAIN}" in line)]  # fmt: skip


def remove_rules(path: str) -> bool:
    """Remove every rule and chain of ours from the namespace; True when there were some."""
    found = False
    for jump in _jumps(path):
        found = True
        _iptables(path, ["iptables", "--wait", "-t", "nat", "-D", *shlex.split(jump)[1:]])
    for chain in (OUTPUT_CHAIN, INBOUND_CHAIN):
        if _iptables(path, ["iptables", "--wait", "-t", "nat", "-F", chain]).returncode == 0:
            found = True
            _iptables(path, ["iptables", "--wait", "-t", "nat", "-X", chain])
    return found


def owners(path: str) -> set[int]:
    """The pids of the daemons whose rules are in the namespace (from the rules' comments)."""
    found = set()
    for jump in _jumps(path):
        for word in shlex.split(jump):
            if word.startswith(OWNER_PREFIX) and word[len(OWNER_PREFIX) :].isdigit():
                found.add(int(word[len(OWNER_PREFIX) :]))
    return found
