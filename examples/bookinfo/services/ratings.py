"""bookinfo `ratings`: the stars each reviewer gave, as Istio's ratings service returns them."""

from __future__ import annotations

from aiohttp import web
from common import serve


async def ratings(request: web.Request) -> web.Response:
    try:
        book_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": "please provide numeric product id"}, status=400)
    return web.json_response({"id": book_id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/ratings/{id}", ratings)
    serve(app)
