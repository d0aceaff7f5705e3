"""The proxy: listeners, the per-request steps, and the connections to upstreams."""
