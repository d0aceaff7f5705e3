"""Processes the bench starts: pinned to a core, bounded in time, always stopped.

Everything listens on 127.0.0.1 ephemeral ports. `Pinning` says which core runs what;
`Process` wraps one child and stops it by its own pid (never by name).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

LOOPBACK = "127.0.0.1"


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which cores run the system under test and the load; `None` when not pinned."""

    server: int | None
    load: int | None
    why_not: str = ""

    @classmethod
    def detect(cls) -> Pinning:
        cores = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None:
            return cls(None, None, "taskset not found (util-linux)")
        if len(cores) < 2:
            return cls(None, None, f"only {len(cores)} core available")
        return cls(cores[0], cores[1])

    @property
    def pinned(self) -> bool:
        return self.server is not None

    def server_cmd(self, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.server), *cmd] if self.server is not None else cmd

    def load_cmd(self, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.load), *cmd] if self.load is not None else cmd

    def on_server(self, work: Callable[[], T]) -> T:
        """`work` run in this process on the server's core, as the system under test runs."""
        if self.server is None:
            return work()
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.server})
        try:
            return work()
        finally:
            os.sched_setaffinity(0, before)

    def describe(self) -> str:
        if not self.pinned:
            return f"not pinned: {self.why_not}; numbers are noisier"
        return (
            f"upstream nginx, nginx proxy and the minimesh gateway on core {self.server}; "
            f"wrk, the open-loop generator and this script on core {self.load} (taskset)"
        )


def free_port() -> int:
    """An ephemeral port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class Process:
    """One child process with its output in a log file; `stop()` ends it by pid."""

    def __init__(self, name: str, cmd: list[str], log: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=cwd
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(grace)
        self._log_file.close()

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"<Process {self.name} pid={self.pid} {state}>"


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, process: Process, deadline: float) -> str | None:
    """Poll until `path` answers 200; the reason it did not, or None once it does."""
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            return f"{process.name} exited with {process.popen.returncode}"
        try:
            status, _, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return None
            last = f"answered {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    return f"{process.name} not ready on port {port}: {last}"


# ---------------------------------------------------------------- CPU use per core


def core_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]
            out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], core: int | None) -> float | None:
    if core is None or core not in before or core not in after:
        return None
    busy = after[core][0] - before[core][0]
    total = after[core][1] - before[core][1]
    return busy / total if total else None


# ---------------------------------------------------------------- tools


APT_PACKAGES = (["nginx-light", "wrk"], ["nginx", "wrk"])
"""Debian 12 has nginx-light; later releases only `nginx`."""


def ensure_tools(say: Callable[[str], None]) -> list[str]:
    """nginx and wrk, installed with apt-get on Debian/Ubuntu as root when missing; what is still missing."""
    missing = [tool for tool in ("nginx", "wrk") if not _which(tool)]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return missing
    for packages in APT_PACKAGES:
        say(f"==> {', '.join(missing)} missing: installing Debian's {' '.join(packages)} with apt-get")
        if _apt_install(packages) or (_apt_update() and _apt_install(packages)):
            break
    return [tool for tool in ("nginx", "wrk") if not _which(tool)]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _apt_update() -> bool:
    return subprocess.run(["apt-get", "update", "-q"], check=False, timeout=300).returncode == 0


def _apt_install(packages: list[str]) -> bool:
    # Keep the packages' init scripts from starting a system nginx on port 80.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
        return subprocess.run(cmd, check=False, env=env, timeout=300).returncode == 0
    finally:
        if ours:
            policy.unlink()


def ensure_h2load(say: Callable[[str], None]) -> bool:
    """h2load (Debian's nghttp2-client), installed with apt-get on Debian/Ubuntu as root when missing."""
    if _which("h2load"):
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    say("==> h2load missing: installing Debian's nghttp2-client with apt-get")
    packages = ["nghttp2-client"]
    return (_apt_install(packages) or (_apt_update() and _apt_install(packages))) and _which("h2load") is not None
