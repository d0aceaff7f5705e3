"""bookinfo `reviews`: v1 shows no stars, v2 black stars, v3 red stars (set by REVIEWS_VERSION).

v2 and v3 ask `ratings` for the stars; when it fails they say so, as Istio's reviews does
(v2 waits up to 10 s for ratings, v3 up to 2.5 s).
"""

from __future__ import annotations

import os

import aiohttp
from aiohttp import web
from common import client_session, forwarded, hostname, serve

VERSION = os.environ.get("REVIEWS_VERSION", "v1")
STAR_COLOR = {"v2": "black", "v3": "red"}.get(VERSION)
RATINGS_TIMEOUT = {"v2": 10.0, "v3": 2.5}.get(VERSION, 0.0)
RATINGS_URL = os.environ.get("RATINGS_URL", "http://ratings:9080")
REVIEWS = [
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
]


async def fetch_ratings(request: web.Request, book_id: int) -> dict[str, int] | None:
    session: aiohttp.ClientSession = request.app["client"]
    try:
        async with session.get(
            f"{RATINGS_URL}/ratings/{book_id}",
            headers=forwarded(request),
            timeout=aiohttp.ClientTimeout(total=RATINGS_TIMEOUT),
        ) as response:
            if response.status != 200:
                return None
            body = await response.json()
            found: dict[str, int] = body.get("ratings", {})
            return found
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def reviews(request: web.Request) -> web.Response:
    try:
        book_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": "please provide numeric product id"}, status=400)
    stars = await fetch_ratings(request, book_id) if STAR_COLOR else None
    entries = []
    for reviewer, text in REVIEWS:
        entry: dict[str, object] = {"reviewer": reviewer, "text": text}
        if STAR_COLOR:
            if stars is None:
                entry["rating"] = {"error": "Ratings service is currently unavailable"}
            else:
                entry["rating"] = {"stars": stars.get(reviewer, 0), "color": STAR_COLOR}
        entries.append(entry)
    return web.json_response({"id": str(book_id), "podname": hostname(), "clustername": "null", "reviews": entries})


if __name__ == "__main__":
    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/reviews/{id}", reviews)
    serve(app)
