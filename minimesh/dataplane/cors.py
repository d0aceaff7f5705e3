"""The CORS step, as Envoy's CORS filter: a preflight from an allowed Origin is answered
here; any other request of a route with a `corsPolicy` carries its CORS headers back.
"""

from __future__ import annotations

from minimesh.dataplane.call import Call
from minimesh.dataplane.upstream import LocalReply
from minimesh.routing.headers import Cors
from minimesh.routing.request import RequestView

PREFLIGHT_OK = LocalReply(200, b"", "")


def is_preflight(view: RequestView) -> bool:
    return view.method == "OPTIONS" and "origin" in view.headers and "access-control-request-method" in view.headers


def cors_step(call: Call, cors: Cors) -> bool:
    """Answer a preflight (True: the request is done), else note the headers the response
    will carry. A preflight from an Origin the policy does not allow goes on upstream,
    unless `unmatchedPreflights: IGNORE` has it answered plainly."""
    origin = call.view.headers.get("origin")
    if is_preflight(call.view):
        headers = cors.preflight_headers(origin)
        if headers or cors.policy.unmatched_preflights == "IGNORE":
            call.reply(PREFLIGHT_OK, headers)
            return True
    call.cors = cors.headers(origin)
    return False
