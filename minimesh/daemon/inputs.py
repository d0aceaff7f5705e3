"""What the daemon's config is made of, as one frozen value: the files as last read, the run-time
layers (applied documents, overlays) and the discovered containers. Every trigger only records
what changed (or proposes a change of layers) and wakes the converge task."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from minimesh.daemon.pipeline import Files
from minimesh.overlays import Layers
from minimesh.registry.watch import Discovered


@dataclass(frozen=True, slots=True)
class Inputs:
    """One state of everything a snapshot is compiled from; nothing in it is changed in place."""

    files: Files = field(default_factory=Files)
    layers: Layers = field(default_factory=Layers)
    discovered: Discovered = field(default_factory=Discovered)


@dataclass(frozen=True, slots=True)
class Proposal:
    """A change of layers a caller awaits (`apply`, overlays): its future has the generation it
    is live in, or the ConfigError that refused it."""

    change: Callable[[Layers], Layers]
    done: asyncio.Future[int]
