"""Config layered over the files at run time: `minimesh apply` and the test overlays API.

`apply` keeps one layer of documents, each replacing the file document of the same kind,
namespace and name (as `kubectl apply`). Overlays are layers with an id, an optional time
to live and an optional scope (then only requests with `x-minimesh-test: SCOPE` see them).
A change makes a new frozen `Layers`; the converge task swaps it in with the snapshots.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from minimesh.config.source import Document


@dataclass(frozen=True, slots=True)
class Overlay:
    id: str
    documents: tuple[Document, ...]
    expires: float | None = None
    scope: str | None = None

    def as_json(self, now: float) -> dict[str, object]:
        left = None if self.expires is None else max(0.0, round(self.expires - now, 1))
        return {
            "id": self.id,
            "scope": self.scope,
            "expiresIn": left,
            "documents": [d.ref for d in self.documents],
        }


def _key(document: Document) -> tuple[str, str, str]:
    return (document.kind, document.namespace, document.name)


@dataclass(frozen=True)
class Layers:
    """The applied documents and the overlays, in the order they were added. A change of layers
    is a new `Layers` (the dicts are never changed in place); every copy shares one id counter."""

    applied: dict[tuple[str, str, str], Document] = field(default_factory=dict)
    overlays: dict[str, Overlay] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def with_applied(self, documents: list[Document]) -> dict[tuple[str, str, str], Document]:
        merged = dict(self.applied)
        merged.update((_key(d), d) for d in documents)
        return merged

    def next_id(self) -> str:
        return f"ov-{next(self._ids)}"

    def scopes(self) -> set[str]:
        return {o.scope for o in self.overlays.values() if o.scope}

    def layers(self, scope: str | None = None, applied: dict[tuple[str, str, str], Document] | None = None,
               extra: Overlay | None = None) -> list[list[Document]]:  # fmt: skip
        """The layers over the files: applied documents, then unscoped overlays, then `scope`'s."""
        found = [list((self.applied if applied is None else applied).values())]
        overlays = [*self.overlays.values(), *([extra] if extra else [])]
        found += [list(o.documents) for o in overlays if o.scope is None]
        if scope is not None:
            found += [list(o.documents) for o in overlays if o.scope == scope]
        return [layer for layer in found if layer]

    def expired(self, now: float) -> list[str]:
        return [o.id for o in self.overlays.values() if o.expires is not None and o.expires <= now]

    def next_expiry(self) -> float | None:
        times = [o.expires for o in self.overlays.values() if o.expires is not None]
        return min(times) if times else None
