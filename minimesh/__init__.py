"""minimesh: a service mesh for local development.

Runs the Istio YAML a team deploys against Docker Compose or local processes.
"""

__version__ = "0.1.0"
