"""The daemon `minimesh up` runs, as one converge loop: `inputs` (what a config is made of),
`pipeline` (read, load, check, compile, RouteTests: `validate` and `explain` use it too),
`converge` (the one task that compiles and swaps), `listeners` (the gateway and sidecars) and
`runtime` (the triggers that wake the converge task, supervision and the admin API's view)."""

from minimesh.daemon.listeners import DaemonError
from minimesh.daemon.pipeline import Compiled, compile_config
from minimesh.daemon.runtime import Daemon, Options, serve

__all__ = ["Compiled", "Daemon", "DaemonError", "Options", "compile_config", "serve"]
