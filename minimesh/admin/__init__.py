"""The admin side of a running daemon: its HTTP API, the metrics and `/config_dump` it serves,
and the client the other commands ask it with."""
