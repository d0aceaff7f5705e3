"""minimesh: a service mesh for local development.

Runs the Istio YAML a team deploys against Docker Compose or local processes.
"""

from minimesh.compiled import HOT_PATH

__version__ = "0.1.0"
__all__ = ["HOT_PATH", "__version__"]
