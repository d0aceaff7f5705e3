"""bookinfo `details`: the book's facts, as Istio's details service returns them."""

from __future__ import annotations

from aiohttp import web
from common import serve

BOOK = {
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
    "ISBN-10": "1234567890",
    "ISBN-13": "123-1234567890",
    "author": "William Shakespeare",
    "year": 1595,
}


async def details(request: web.Request) -> web.Response:
    try:
        book_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": "please provide numeric product id"}, status=400)
    return web.json_response({"id": book_id, **BOOK})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/details/{id}", details)
    serve(app)
