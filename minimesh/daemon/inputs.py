"""What the daemon's config is made of, as one frozen value: which save of the files, the
run-time layers (applied documents, overlays) and the discovered containers. Every trigger
only records new inputs (or proposes a change of layers) and wakes the converge task."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from minimesh.overlays import Layers
from minimesh.registry.watch import Discovered


@dataclass(frozen=True, slots=True)
class Inputs:
    """One state of everything a snapshot is compiled from. `files` counts the changes seen to
    the files: a new count means they are read again. `layers` is never changed in place."""

    files: int = 0
    layers: Layers = field(default_factory=Layers)
    discovered: Discovered = field(default_factory=Discovered)


@dataclass(frozen=True, slots=True)
class Proposal:
    """A change of layers a caller awaits (`apply`, overlays): compiled in a pass of its own,
    its future has the generation it is live in, or the ConfigError that refused it."""

    change: Callable[[Layers], Layers]
    done: asyncio.Future[int]
