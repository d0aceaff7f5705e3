"""Closed-loop load with wrk: fixed threads, connections and duration, after a warm-up.

A small Lua `done` hook prints the totals and percentiles as JSON, so nothing is parsed
from wrk's human-readable table (which `--latency` still prints to the log).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import Pinning, busy_share, core_times

MARK = "BENCH-JSON "
REPORT_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, "connect": %.0f, "read": %.0f, '
    .. '"write": %.0f, "status": %.0f, "timeout": %.0f, "p50_us": %.1f, "p90_us": %.1f, '
    .. '"p99_us": %.1f, "max_us": %.1f, "mean_us": %.1f}\\n',
    "BENCH-JSON ", summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True, slots=True)
class Load:
    """How wrk drives a scenario; the same for every scenario."""

    threads: int = 1
    connections: int = 64
    rounds: int = 3
    warmup: float = 3.0
    rewarm: float = 1.0
    duration: float = 5.0

    def describe(self) -> str:
        rounds = f"{self.rounds} interleaved rounds of" if self.rounds > 1 else "one round of"
        return (
            f"wrk -t{self.threads} -c{self.connections} --latency; {rounds} {self.duration:g} s per scenario "
            f"after a warm-up ({self.warmup:g} s, then {self.rewarm:g} s); medians over rounds"
        )

    def seconds(self) -> float:
        """Wall time of one scenario over every round."""
        return self.warmup + (self.rounds - 1) * self.rewarm + self.rounds * self.duration


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk")
    return found


def run(url: str, load: Load, pinning: Pinning, workdir: Path, name: str, warmup: float) -> dict[str, Any]:
    """Warm up, then measure; the result with per-core CPU use during the measurement."""
    script = workdir / "report.lua"
    if not script.exists():
        script.write_text(REPORT_LUA)
    if warmup > 0:
        _wrk(url, load, warmup, pinning, script, workdir / f"wrk-{name}-warmup.log")
    before = core_times()
    result = _wrk(url, load, load.duration, pinning, script, workdir / f"wrk-{name}.log")
    after = core_times()
    seconds = result["duration_us"] / 1e6
    errors = sum(int(result[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": result["requests"] / seconds if seconds else 0.0,
        "requests": int(result["requests"]),
        "p50_ms": result["p50_us"] / 1000,
        "p90_ms": result["p90_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "errors": errors,
        "non_2xx": int(result["status"]),
        "cpu_server": busy_share(before, after, pinning.server),
        "cpu_load": busy_share(before, after, pinning.load),
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario over several rounds: medians, error totals, and each round's req/s."""

    def median(key: str) -> float | None:
        values = [row[key] for row in rounds if row[key] is not None]
        return statistics.median(values) if values else None

    return {
        "rps": median("rps"),
        "p50_ms": median("p50_ms"),
        "p90_ms": median("p90_ms"),
        "p99_ms": median("p99_ms"),
        "max_ms": max(row["max_ms"] for row in rounds),
        "errors": sum(row["errors"] for row in rounds),
        "non_2xx": sum(row["non_2xx"] for row in rounds),
        "requests": sum(row["requests"] for row in rounds),
        "cpu_server": median("cpu_server"),
        "cpu_load": median("cpu_load"),
        "rps_rounds": [round(row["rps"]) for row in rounds],
    }


def start_background(url: str, load: Load, seconds: float, pinning: Pinning, log: Path) -> subprocess.Popen[bytes]:
    """wrk at saturation while something else (the profiler) watches."""
    cmd = pinning.load_cmd(
        [wrk_binary(), f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds:g}s", "--timeout", "5s", url]
    )
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wrk(url: str, load: Load, seconds: float, pinning: Pinning, script: Path, log: Path) -> dict[str, float]:
    cmd = pinning.load_cmd(
        [wrk_binary(), f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds:g}s", "--timeout", "5s",
         "--latency", "-s", str(script), url]
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    log.write_text(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"wrk gave no result for {url} (exit {done.returncode}); see {log}:\n{done.stderr[-500:]}")
