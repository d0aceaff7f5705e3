"""Go-style durations as Istio writes them (`100ms`, `1.5s`, `1m30s`, `1h`).

One parser, Go's `time.ParseDuration` to the nanosecond: the loader reads seconds from it
and the CEL `duration()` of Istio's schema rules reads nanoseconds.
"""

from __future__ import annotations

import re
from typing import NoReturn

HINT = "use a number with a unit: 100ms, 1.5s, 1m, 1h"
UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DIGITS = re.compile(r"[0-9]*")
_NOT_DIGITS = re.compile(r"[^.0-9]*")
_LIMIT = 1 << 63


def show(text: str) -> str:
    """`text` quoted for an error message, cut at 60 characters."""
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f"'{shown}'" if shown.isprintable() and "'" not in shown else repr(shown)


def _take(pattern: re.Pattern[str], text: str, start: int = 0) -> str:
    match = pattern.match(text, start)
    return match.group(0) if match else ""


def _leading_fraction(digits: str) -> tuple[int, float]:
    value, scale = 0, 1.0
    for digit in digits:
        if value > (_LIMIT - 1) // 10 or value * 10 + int(digit) > _LIMIT:
            break
        value, scale = value * 10 + int(digit), scale * 10
    return value, scale


def duration_nanos(text: str) -> int:
    """Nanoseconds in `text`, exactly as Go's time.ParseDuration computes them; ValueError else."""

    def invalid() -> NoReturn:
        raise ValueError(f"invalid duration {show(text)}; {HINT}")

    rest, negative = text, text[:1] == "-"
    if text[:1] in ("-", "+"):
        rest = text[1:]
    if rest == "0":
        return 0
    if not rest:
        invalid()
    total = 0
    while rest:
        if not (rest[0] == "." or "0" <= rest[0] <= "9"):
            invalid()
        whole_digits = _take(_DIGITS, rest)
        rest = rest[len(whole_digits) :]
        fraction, scale, fraction_digits = 0, 1.0, ""
        if rest.startswith("."):
            fraction_digits = _take(_DIGITS, rest, 1)
            rest = rest[1 + len(fraction_digits) :]
            fraction, scale = _leading_fraction(fraction_digits)
        if not whole_digits and not fraction_digits:
            invalid()
        unit = _take(_NOT_DIGITS, rest)
        rest = rest[len(unit) :]
        factor = UNITS.get(unit)
        whole = int(whole_digits or "0")
        if factor is None or whole > _LIMIT // factor:
            invalid()
        nanos = whole * factor
        if fraction:
            nanos += int(float(fraction) * (float(factor) / scale))
        total += nanos
        if nanos > _LIMIT or total > _LIMIT:
            invalid()
    if not negative and total > _LIMIT - 1:
        invalid()
    return -total if negative else total


def parse_duration(text: str) -> float:
    """Seconds in `text` (Go's syntax); ValueError with how to write one when it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}; {HINT}")
    return duration_nanos(text) / 1e9


def format_duration(seconds: float) -> str:
    """The shortest Istio-style spelling of `seconds` (`250ms`, `1.5s`)."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"
