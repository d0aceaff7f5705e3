"""The admin side of a running daemon: its HTTP API and the metrics it serves."""
