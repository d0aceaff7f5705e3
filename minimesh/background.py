"""A daemon in the background: `minimesh up --detach` starts one, `minimesh down` stops it.

It is found by its pid file `.minimesh/minimesh.pid`; its output goes to `.minimesh/minimesh.log`;
what it was started with is in `.minimesh/minimesh.args`, so that `up --detach` again with the
same settings finds it running (exit 0, as `docker compose up -d` does) and other settings are
reported with the command that replaces it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from minimesh.admin.client import POLL_INTERVAL, is_ready, wait_ready

STATE_DIR = Path(".minimesh")
PID_FILE = STATE_DIR / "minimesh.pid"
LOG_FILE = STATE_DIR / "minimesh.log"
ARGS_FILE = STATE_DIR / "minimesh.args"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
TAIL_LINES = 20


def self_command() -> list[str]:
    """How to run this minimesh again: the single binary itself, or this Python with `-m minimesh`."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "minimesh"]


def alive(pid: int) -> bool:
    """Does process `pid` still run (a zombie does not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in {"Z", "X"}


def recorded_pid() -> int | None:
    try:
        text = PID_FILE.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def recorded_settings() -> dict[str, str] | None:
    """What the detached daemon was started with (None: not recorded)."""
    try:
        found = json.loads(ARGS_FILE.read_text())
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


def differences(running: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """`OPTION RUNNING, not WANTED` for each setting the two disagree on."""
    return [
        f"{option} {running.get(option) or '(none)'}, not {wanted.get(option) or '(none)'}"
        for option in sorted({*running, *wanted})
        if running.get(option) != wanted.get(option)
    ]


def detach(up_args: Sequence[str], settings: Mapping[str, str], admin: str, gateway: str) -> int:
    """Start `minimesh up UP_ARGS` in the background; 0 once it is ready, 1 if it died. When a
    detached daemon already runs: 0 once it is ready if it runs with these `settings`, else 1
    with what differs and the command that replaces it."""
    pid = recorded_pid()
    if pid is not None and alive(pid):
        return _already_running(pid, up_args, settings, admin, gateway)
    STATE_DIR.mkdir(exist_ok=True)
    with LOG_FILE.open("wb") as log:
        process = subprocess.Popen(
            [*self_command(), "up", *up_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    PID_FILE.write_text(f"{process.pid}\n")
    ARGS_FILE.write_text(json.dumps(dict(settings), indent=2) + "\n")
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _forget()
            print(tail(LOG_FILE), file=sys.stderr)
            print(f"minimesh: error: the daemon exited with code {process.returncode}; its log is {LOG_FILE}",
                  file=sys.stderr)  # fmt: skip
            return 1
        if is_ready(admin):
            print(f"minimesh: daemon running (pid {process.pid}): gateway {gateway}, admin {admin}; log {LOG_FILE}; "
                  "stop: minimesh down")  # fmt: skip
            return 0
        time.sleep(POLL_INTERVAL)
    process.terminate()
    process.wait(STOP_TIMEOUT)
    _forget()
    print(tail(LOG_FILE), file=sys.stderr)
    print(f"minimesh: error: the daemon was not ready within {READY_TIMEOUT:.0f} s; stopped it; its log is {LOG_FILE}",
          file=sys.stderr)  # fmt: skip
    return 1


def _already_running(pid: int, up_args: Sequence[str], settings: Mapping[str, str], admin: str, gateway: str) -> int:
    replace = f"minimesh down && minimesh up --detach {shlex.join(up_args)}".rstrip()
    running = recorded_settings()
    if running is None:
        print(f"minimesh: error: a detached daemon already runs (pid {pid}), with no record of its settings; "
              f"to replace it: {replace}", file=sys.stderr)  # fmt: skip
        return 1
    changed = differences(running, settings)
    if changed:
        what = "; ".join(changed)
        print(f"minimesh: error: a detached daemon already runs (pid {pid}) with other settings ({what}); "
              f"to replace it: {replace}", file=sys.stderr)  # fmt: skip
        return 1
    if not wait_ready(admin, READY_TIMEOUT):
        print(tail(LOG_FILE), file=sys.stderr)
        print(f"minimesh: error: the detached daemon (pid {pid}) runs but was not ready within {READY_TIMEOUT:.0f} s; "
              f"its log is {LOG_FILE}", file=sys.stderr)  # fmt: skip
        return 1
    print(f"minimesh: the daemon already runs (pid {pid}) with these settings: gateway {gateway}, admin {admin}; "
          f"log {LOG_FILE}; stop: minimesh down")  # fmt: skip
    return 0


def _forget() -> None:
    """The detached daemon is gone: remove its pid and settings."""
    PID_FILE.unlink(missing_ok=True)
    ARGS_FILE.unlink(missing_ok=True)


def down() -> int:
    """Stop the detached daemon: SIGTERM, wait, SIGKILL if it will not stop; 0 also when none runs."""
    pid = recorded_pid()
    if pid is None:
        print(f"minimesh: no detached daemon runs here (no {PID_FILE})")
        return 0
    if not alive(pid):
        _forget()
        print(f"minimesh: the daemon of pid {pid} was not running; removed {PID_FILE}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    how = "stopped"
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        how = f"killed (it did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM)"
    _forget()
    print(f"minimesh: {how} the daemon (pid {pid})")
    return 0
