"""Config a user can save by mistake that once took the daemon down (issue 12): each one must
be refused with a located `FILE:LINE:COL: error:`, by `validate`, a reload, `apply` and overlays."""

from __future__ import annotations

from dataclasses import dataclass

HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hostile}
spec:
  hosts: [hostile.example]
"""


def alias_bomb(levels: int = 6, fanout: int = 10) -> str:
    """A few hundred bytes whose aliases expand to `fanout ** levels` nodes ("billion laughs")."""
    items = ", ".join(["lol"] * fanout)
    lines = [f"  l0: &l0 [{items}]"]
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * fanout) + "]")
    return HEAD.replace("spec:\n", "spec:\n" + "\n".join(lines) + "\n")


@dataclass(frozen=True)
class Hostile:
    """A file's bytes, and where and what the error about it says."""

    name: str
    data: bytes
    where: str
    """`LINE:COL` of the error."""
    message: str
    """A part of the error's message."""


HOSTILE = (
    Hostile("flow nesting 500 deep", (HEAD + "  http: " + "[" * 500 + "]" * 500 + "\n").encode(), "6:107",
            "YAML nested deeper than 100 levels"),
    Hostile("!!int abc", (HEAD + "  http: [{timeout: !!int abc}]\n").encode(), "6:20", "'abc' is not a valid !!int"),
    Hostile("!!float zz", (HEAD + "  http: [{timeout: !!float zz}]\n").encode(), "6:20",
            "'zz' is not a valid !!float"),
    Hostile("!!bool maybe", (HEAD + "  http: [{timeout: !!bool maybe}]\n").encode(), "6:20",
            "'maybe' is not a valid !!bool"),
    Hostile("!!timestamp 2001-13-45", (HEAD + "  http: [{timeout: !!timestamp 2001-13-45}]\n").encode(), "6:20",
            "'2001-13-45' is not a valid !!timestamp"),
    Hostile("unknown tag", (HEAD + "  http: [{timeout: !!python/object:os.system x}]\n").encode(), "6:20",
            "unknown tag '!!python/object:os.system'"),
    Hostile("alias bomb", alias_bomb().encode(), "8:27", "document contains excessive aliasing"),
    Hostile("alias inside its anchor", (HEAD + "  http: &loop [*loop]\n").encode(), "6:16",
            "alias '*loop' is inside the node it repeats"),
    Hostile("not UTF-8", HEAD.encode() + b"  http: [{name: caf\xe9}]\n", "6:20", "not UTF-8: byte 0xe9"),
    Hostile("a NUL character", (HEAD + "  http: [{name: a\x00b}]\n").encode(), "6:18",
            "character U+0000 is not allowed"),
    Hostile("over 3 MiB", (HEAD + "  gateways: [" + "g, " * (1 << 20) + "g]\n").encode(), "1:1",
            "over the 3 MiB limit of a Kubernetes request"),
)  # fmt: skip
