"""Routing: the config model and the registry compiled into an immutable `Snapshot`,
and the pure per-request decision over it (`decide`, `trace`) with Istio's semantics.
"""
