"""Where the gateway spends its time at saturation: py-spy, summarised by function.

`py-spy record --format raw --function` writes collapsed stacks (`f1;f2;...;leaf COUNT`),
which speedscope and flamegraph.pl read; from them come each function's own time (it is
the leaf) and total time (it is anywhere on the stack), on the event-loop thread. Time
inside C code (llhttp, socket writes, uvloop itself) is charged to the Python function
that called it; `Runner.run` as a leaf is the loop's own C code (polling, callbacks).
py-spy also samples threads blocked in C (a file watcher, an idle executor) as busy, so
other threads are counted apart and their real CPU use is read from /proc.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from procs import Pinning
from wrk import Load, start_background

RATE = 200
PERF_SECONDS = 5
GC_SYMBOLS = frozenset(
    {"gc_collect_main", "visit_decref", "visit_reachable", "move_unreachable", "subtract_refs", "update_refs",
     "deduce_unreachable", "gc_collect_with_callback", "move_legacy_finalizers"}
)  # fmt: skip
"""CPython's cyclic garbage collector, as perf names its C functions."""
ROOT = f"{Path(__file__).resolve().parent.parent}/"


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, url: str, load: Load, pinning: Pinning, seconds: float, out: Path, logs: Path,
           upstream: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Drive `url` with wrk at saturation; sample `pid` with py-spy for `seconds`, then with
    perf (when it is there) for a few more. The `upstream` process tree moves to the load core
    meanwhile, so the samples are the gateway's own work, not the upstream running in its place."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
    native = shutil.which("perf")
    moved = _move(upstream, pinning.load) if upstream is not None and pinning.load is not None else {}
    wrk = start_background(url, load, seconds + (PERF_SECONDS if native else 0) + 3, pinning, logs / "wrk-profile.log")
    try:
        time.sleep(1.0)
        before, started = thread_ticks(pid), time.monotonic()
        problem = spy(binary, pid, seconds, out, pinning, "--subprocesses")
        after, elapsed = thread_ticks(pid), time.monotonic() - started
        perf = perf_split(pid, pinning, logs) if native else "perf not installed (apt-get install linux-perf)"
    except BaseException:
        wrk.kill()
        raise
    finally:
        wrk.wait(seconds + PERF_SECONDS + 30)
        for task, cores in moved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(task, cores)
    if problem is not None:
        raise RuntimeError(problem)
    text = (logs / "wrk-profile.log").read_text(errors="replace")
    found = re.search(r"Requests/sec:\s*([\d.]+)", text)
    ticks = os.sysconf("SC_CLK_TCK") * elapsed
    main_cpu = (after.get(pid, 0) - before.get(pid, 0)) / ticks
    other_cpu = sum(after[tid] - before.get(tid, 0) for tid in after if tid != pid) / ticks
    return summarise(out) | {
        "rps_while_profiling": float(found.group(1)) if found else None,
        "upstream_moved": bool(moved),
        "cpu_main_thread": main_cpu,
        "cpu_other_threads": other_cpu,
        "stacks": str(out),
        "native": perf,
    }


def spy(binary: str, pid: int, seconds: float, out: Path, pinning: Pinning, *options: str) -> str | None:
    """py-spy's collapsed stacks of `pid` (`stacks` reads them) for `seconds` into `out`,
    py-spy itself on the load core; None, or why there are none."""
    cmd = [binary, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", str(RATE),
           "--format", "raw", "--function", *options, "--output", str(out)]  # fmt: skip
    try:
        done = subprocess.run(pinning.load_cmd(cmd), capture_output=True, text=True, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired:
        return f"py-spy did not finish within {seconds + 30:g} s"
    if done.returncode != 0 or not out.exists():
        return f"py-spy failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}"
    return None


def stacks(collapsed: Path) -> Iterator[tuple[list[str], int]]:
    """Each stack py-spy sampled (outermost frame first) and how many times."""
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def _move(root: int, core: int) -> dict[int, set[int]]:
    """Pin a process and its children to `core`; their previous affinity, to put back."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children[int(stat.read_text().rpartition(")")[2].split()[1])].append(int(stat.parent.name))
    moved: dict[int, set[int]] = {}
    todo = [root]
    while todo:
        task = todo.pop()
        with contextlib.suppress(OSError):
            moved[task] = os.sched_getaffinity(task)
            os.sched_setaffinity(task, {core})
        todo += children.get(task, [])
    return moved


def perf_split(pid: int, pinning: Pinning, logs: Path) -> dict[str, Any] | str:
    """Where the gateway's CPU goes below Python: kernel, interpreter, cyclic GC, C extensions
    (perf samples only while it runs on a CPU, so waiting is never counted)."""
    data = logs / "perf.data"
    cmd = ["perf", "record", "--quiet", "-F", "999", "-o", str(data), "-p", str(pid), "--", "sleep", str(PERF_SECONDS)]
    done = subprocess.run(pinning.load_cmd(cmd), capture_output=True, text=True, timeout=PERF_SECONDS + 30, check=False)
    if done.returncode != 0 or not data.exists():
        return f"perf record failed: {(done.stderr or done.stdout).strip()[-300:]}"
    dsos = _perf_report(data, "dso")
    symbols = _perf_report(data, "sym")
    gc = sum(share for name, share in symbols if name in GC_SYMBOLS)
    return {
        "kernel": sum(share for name, share in dsos if name.startswith("[kernel")),
        "python": sum(share for name, share in dsos if name.startswith(("libpython", "python"))),
        "gc": gc,
        "dsos": dsos[:6],
        "symbols": symbols[:10],
    }


def _perf_report(data: Path, key: str) -> list[tuple[str, float]]:
    cmd = ["perf", "report", "-i", str(data), "--sort", key, "--stdio", "--percent-limit", "0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    rows = []
    for line in done.stdout.splitlines():
        found = re.match(r"\s*([\d.]+)%\s+(?:\[[.k]\]\s+)?(.+?)\s*$", line)
        if found and not line.lstrip().startswith("#"):
            rows.append((found.group(2), float(found.group(1)) / 100))
    return rows


def thread_ticks(pid: int) -> dict[int, int]:
    """CPU time (user + system, in clock ticks) of each thread of `pid`."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(task.name)] = int(fields[11]) + int(fields[12])
    return out


def summarise(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """Own and total time per function on the event-loop (main) thread; other threads apart."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    samples = 0
    asyncio_loop = False
    for stack, count in stacks(collapsed):
        frames = [_short(frame) for frame in stack if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        if not frames[0].startswith("<module>"):
            others[frames[-1]] += count
            continue
        samples += count
        own[frames[-1]] += count
        asyncio_loop = asyncio_loop or any("asyncio/base_events.py" in frame for frame in frames)
        for frame in set(frames):
            total[frame] += count

    def rows(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "share": n / samples, "total_share": total[name] / samples}
            for name, n in counter.most_common(top)
        ]

    other_samples = sum(others.values())
    return {
        "samples": samples,
        "rate_hz": RATE,
        "loop": "asyncio" if asyncio_loop else "uvloop",
        "own": rows(own),
        "other_threads": {
            "samples": other_samples,
            "where": [{"function": name, "samples": n} for name, n in others.most_common(5)],
        },
    }


def _short(frame: str) -> str:
    """`handle (minimesh/dataplane/proxy.py:142)` with long site-packages paths cut."""
    frame = re.sub(r"\(.*?/(site-packages|lib/python3\.\d+)/", "(", frame)
    return frame.replace(f"({ROOT}", "(")
