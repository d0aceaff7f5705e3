"""The request as routing sees it: method, path, authority, headers and who sent it.

Built by the data plane per request, or by `explain` from a URL; pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

from minimesh.registry.model import Workload

DEFAULT_PORTS = {"http": 80, "https": 443}


def split_authority(authority: str) -> tuple[str, int | None]:
    """`reviews:9080` → (`reviews`, 9080); IPv6 `[::1]:80` → (`[::1]`, 80); a bad port is no port."""
    host, sep, port = authority.rpartition(":")
    if not sep or host.endswith(":") or (host.startswith("[") and not host.endswith("]")):
        return authority.lower(), None
    if port.isdigit() and 0 < int(port) < 65536:
        return host.lower(), int(port)
    return authority.lower(), None


class RequestView:
    """What routing needs of one request; header names are lower-case. Read-only by
    convention: a plain class, because it is made per request (see `Facts`)."""

    __slots__ = ("authority", "gateway", "headers", "method", "path", "peer", "port", "scheme", "source")

    def __init__(
        self,
        method: str,
        path: str,
        authority: str,
        headers: Mapping[str, str],
        scheme: str = "http",
        port: int | None = None,
        source: Workload | None = None,
        gateway: str = "mesh",
        peer: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.scheme = scheme
        self.port = port
        self.source = source
        self.gateway = gateway
        self.peer = peer
        """The downstream connection's address, `IP:PORT`."""

    @classmethod
    def from_url(
        cls,
        method: str,
        url: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        source: Workload | None = None,
        gateway: str = "mesh",
    ) -> RequestView:
        """A request for `url`; a `Host` header overrides the URL's authority, as curl does."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        lowered = {name.lower(): value for name, value in pairs}
        authority = lowered.pop("host", None) or lowered.pop(":authority", None) or parts.netloc
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(
            method=method.upper(),
            path=path,
            authority=authority,
            headers=lowered,
            scheme=parts.scheme or "http",
            source=source,
            gateway=gateway,
        )

    @property
    def source_address(self) -> str:
        """The downstream IP, without the port."""
        return self.peer.rpartition(":")[0]

    @property
    def path_only(self) -> str:
        """The path without its query string (what Envoy's path matchers see)."""
        return self.path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.path.partition("?")[2]

    def query_params(self) -> dict[str, str]:
        """Decoded query parameters; the first value of a repeated name, as Envoy reads them."""
        params: dict[str, str] = {}
        for pair in self.query.split("&"):
            if not pair:
                continue
            name, _, value = pair.partition("=")
            params.setdefault(unquote(name), unquote(value))
        return params

    def __repr__(self) -> str:
        where = f" via {self.gateway}" if self.gateway != "mesh" else ""
        who = f" from {self.source}" if self.source else ""
        return f"<RequestView {self.method} {self.scheme}://{self.authority}{self.path}{where}{who}>"
