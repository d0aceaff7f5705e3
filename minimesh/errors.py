"""The one exception tree of minimesh, and the located problems config reports.

Every user-facing failure is a `MinimeshError`; config problems carry the file, line,
column and the resource they belong to so they print as one clear line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True, slots=True)
class Location:
    """A place in a config file: 1-based line and column."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of validation: where, what, and which resource field."""

    location: Location
    severity: Severity
    message: str
    resource: str = ""
    field: str = ""

    def __str__(self) -> str:
        text = f"{self.location}: {self.severity}: {self.message}"
        context = " ".join(part for part in (self.resource, self.field) if part)
        return f"{text} ({context})" if context else text

    def as_json(self) -> dict[str, object]:
        return {
            "file": self.location.file,
            "line": self.location.line,
            "col": self.location.col,
            "severity": self.severity,
            "message": self.message,
            "resource": self.resource,
            "field": self.field,
        }


class MinimeshError(Exception):
    """Base of every error minimesh reports to a user as one line."""


class ConfigError(MinimeshError):
    """Config that cannot be used; carries every error-level problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
