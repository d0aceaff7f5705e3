"""Which failures a route retries: Envoy's `retry_on` conditions as Istio programs them.

Pure: built once per policy from routing's `RetryPolicy`, then asked per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from minimesh.dataplane.upstream import GATEWAY_ERRORS
from minimesh.routing.snapshot import RetryPolicy

RETRIABLE_4XX = frozenset({409})
FAILURES_RETRIED_BY = {
    "5xx": frozenset({"UF", "UC", "UT"}),
    "gateway-error": frozenset({"UF", "UC", "UT"}),
    "reset": frozenset({"UF", "UC", "UT"}),
    "connect-failure": frozenset({"UF"}),
}
"""Local failures each condition covers: connect failure (UF), reset (UC), per-try timeout (UT)."""


@dataclass(frozen=True, slots=True)
class RetryDecider:
    """Answers, for one retry policy, whether an attempt's result is worth another try."""

    attempts: int = 0
    statuses: frozenset[int] = frozenset()
    any_5xx: bool = False
    failures: frozenset[str] = frozenset()
    per_try_timeout: float | None = None

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
        return cls(policy.attempts, frozenset(statuses), "5xx" in on, failures, policy.per_try_timeout)

    def retries_status(self, status: int) -> bool:
        return (self.any_5xx and status >= 500) or status in self.statuses

    def retries_failure(self, flag: str) -> bool:
        return flag in self.failures


NO_RETRY = RetryDecider()
