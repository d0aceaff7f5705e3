"""How a workload's traffic reaches its sidecar: `netns` (transparent) or `explicit` (HTTP_PROXY)."""
