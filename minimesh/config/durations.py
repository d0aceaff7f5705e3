"""Go-style durations as Istio writes them (`100ms`, `1.5s`, `1m30s`, `1h`), in seconds."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_WHOLE = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")

HINT = "use a number with a unit: 100ms, 1.5s, 1m, 1h"


def parse_duration(text: str) -> float:
    """Seconds in `text`, as Go's time.ParseDuration reads it; ValueError when it is not one."""
    if text == "0":
        return 0.0
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise ValueError(f"invalid duration '{text}'; {HINT}")
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest Istio-style spelling of `seconds` (`250ms`, `1.5s`)."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"
