"""Which failures a route retries: Envoy's `retry_on` conditions as Istio programs them,
the gRPC ones (`unavailable`...) included.

Pure: compiled once per route from its `RetryPolicy` (`Route.retry`), then asked per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from minimesh.config.durations import format_duration
from minimesh.config.model import GRPC_CODES
from minimesh.routing.headers import HeaderList

GATEWAY_ERRORS = frozenset({502, 503, 504})
"""The statuses Envoy counts as gateway errors (retry_on `gateway-error`, outlier detection)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Envoy's retry policy as Istio builds it: `attempts` retries on `retry_on`."""

    attempts: int
    retry_on: tuple[str, ...]
    retriable_status_codes: tuple[int, ...] = ()
    per_try_timeout: float | None = None

    def __str__(self) -> str:
        on = ",".join(self.retry_on)
        codes = f" codes {','.join(map(str, self.retriable_status_codes))}" if self.retriable_status_codes else ""
        per_try = f" per try {format_duration(self.per_try_timeout)}" if self.per_try_timeout else ""
        return f"{self.attempts} retries on {on}{codes}{per_try}"


RETRIABLE_4XX = frozenset({409})
REFUSED = "refused"
"""A stream the upstream refused (REFUSED_STREAM, or above a GOAWAY's last stream id): flagged
`UR` like any reset, but also retried by `refused-stream`."""
ANY_RESET = frozenset({"UF", "UC", "UT", "UR", REFUSED})
FAILURES_RETRIED_BY = {
    "5xx": ANY_RESET,
    "gateway-error": ANY_RESET,
    "reset": ANY_RESET,
    "connect-failure": frozenset({"UF"}),
    "refused-stream": frozenset({REFUSED}),
}
"""Local failures each condition covers (Envoy's `wouldRetryFromReset`): connect failure (UF),
connection lost (UC), per-try timeout (UT), a stream reset by the upstream (UR) or refused."""
GRPC_CONDITIONS = {
    "cancelled": GRPC_CODES["CANCELLED"],
    "deadline-exceeded": GRPC_CODES["DEADLINE_EXCEEDED"],
    "internal": GRPC_CODES["INTERNAL"],
    "resource-exhausted": GRPC_CODES["RESOURCE_EXHAUSTED"],
    "unavailable": GRPC_CODES["UNAVAILABLE"],
}
"""The gRPC conditions and the `grpc-status` each retries (Envoy's `x-envoy-retry-grpc-on` names)."""


@dataclass(frozen=True, slots=True)
class RetryDecider:
    """Answers, for one retry policy, whether an attempt's result is worth another try."""

    attempts: int = 0
    statuses: frozenset[int] = frozenset()
    any_5xx: bool = False
    failures: frozenset[str] = frozenset()
    per_try_timeout: float | None = None
    grpc_statuses: frozenset[int] = frozenset()

    @classmethod
    def of(cls, policy: RetryPolicy | None) -> RetryDecider:
        if policy is None or policy.attempts <= 0:
            return NO_RETRY
        on = set(policy.retry_on)
        statuses: set[int] = set()
        if "gateway-error" in on:
            statuses |= GATEWAY_ERRORS
        if "retriable-4xx" in on:
            statuses |= RETRIABLE_4XX
        if "retriable-status-codes" in on:
            statuses |= set(policy.retriable_status_codes)
        failures = frozenset().union(*[FAILURES_RETRIED_BY.get(condition, frozenset()) for condition in on])
        grpc = frozenset(code for condition, code in GRPC_CONDITIONS.items() if condition in on)
        return cls(policy.attempts, frozenset(statuses), "5xx" in on, failures, policy.per_try_timeout, grpc)

    def retries_response(self, status: int, headers: HeaderList) -> bool:
        """Whether a response (its head) is retried: by its status, or, as Envoy's
        `wouldRetryFromHeaders`, by a `grpc-status` in its headers (a trailers-only gRPC
        response; trailers are never waited for), whatever the request."""
        if (self.any_5xx and status >= 500) or status in self.statuses:
            return True
        if self.grpc_statuses:
            for name, value in headers:
                if name == b"grpc-status":
                    return value.isdigit() and int(value) in self.grpc_statuses
        return False

    def retries_failure(self, flag: str, *, refused: bool = False) -> bool:
        """Whether a failure flagged `flag` is retried; `refused` for a refused stream."""
        return (REFUSED if refused else flag) in self.failures


NO_RETRY = RetryDecider()
