"""bookinfo `productpage`: the page a user sees, built from `details` and `reviews`.

As Istio's productpage: `/login` sets the user (a form, or `?user=NAME`), the user is
forwarded as `end-user` with the trace headers, details gets 3 s and reviews gets two
tries of 3 s each before the page says they are unavailable.
"""

from __future__ import annotations

import asyncio
import html
import os

import aiohttp
from aiohttp import web
from common import client_session, forwarded, serve

DETAILS_URL = os.environ.get("DETAILS_URL", "http://details:9080")
REVIEWS_URL = os.environ.get("REVIEWS_URL", "http://reviews:9080")
TIMEOUT = aiohttp.ClientTimeout(total=3.0)
PRODUCT = {"id": 0, "title": "The Comedy of Errors", "descriptionHtml": (
    "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors "
    "is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies."
)}  # fmt: skip
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."


def outgoing(request: web.Request) -> dict[str, str]:
    headers = forwarded(request)
    user = request.cookies.get("user")
    if user:
        headers["end-user"] = user
    return headers


async def get_json(request: web.Request, url: str, tries: int) -> tuple[int, dict[str, object] | None]:
    session: aiohttp.ClientSession = request.app["client"]
    status = 503
    for _ in range(tries):
        try:
            async with session.get(url, headers=outgoing(request), timeout=TIMEOUT) as response:
                status = response.status
                if status == 200:
                    body: dict[str, object] = await response.json()
                    return status, body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            status = 503
    return status, None


def stars(rating: object) -> str:
    if not isinstance(rating, dict):
        return ""
    if "error" in rating:
        return f'<p class="ratings-error"><i>{html.escape(str(rating["error"]))}</i></p>'
    count = int(rating.get("stars", 0))
    color = html.escape(str(rating.get("color", "black")))
    return f'<font color="{color}" class="stars">{"★" * count}{"☆" * (5 - count)}</font>'


def page(user: str | None, details: dict[str, object] | None, reviews: dict[str, object] | None) -> str:
    login = (
        f'<p class="user">signed in as <b>{html.escape(user)}</b> <a href="/logout">sign out</a></p>'
        if user
        else '<form method="post" action="/login"><input name="username" placeholder="user">'
        '<input name="passwd" type="password" placeholder="password"><button>Sign in</button></form>'
    )
    if details is None:
        details_html = f"<h4>Error fetching product details!</h4><p>{DETAILS_UNAVAILABLE}</p>"
    else:
        rows = "".join(
            f"<dt>{html.escape(k)}:</dt><dd>{html.escape(str(v))}</dd>" for k, v in details.items() if k != "id"
        )
        details_html = f"<h4>Book Details</h4><dl>{rows}</dl>"
    if reviews is None:
        reviews_html = f"<h4>Error fetching product reviews!</h4><p>{REVIEWS_UNAVAILABLE}</p>"
    else:
        entries = reviews.get("reviews", [])
        items = "".join(
            f"<blockquote><p>{html.escape(str(r.get('text', '')))}</p><small>{html.escape(str(r.get('reviewer', '')))}"
            f"</small>{stars(r.get('rating'))}</blockquote>"
            for r in entries
            if isinstance(r, dict)
        )
        served = html.escape(str(reviews.get("podname", "")))
        reviews_html = f"<h4>Book Reviews</h4>{items}<dl><dt>Reviews served by:</dt><dd><u>{served}</u></dd></dl>"
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Simple Bookstore App</title></head><body>'
        f'<nav><a href="/productpage">BookInfo Sample</a>{login}</nav>'
        f"<h3>{PRODUCT['title']}</h3><p>{PRODUCT['descriptionHtml']}</p>"
        f'<div class="details">{details_html}</div><div class="reviews">{reviews_html}</div></body></html>'
    )


async def product_page(request: web.Request) -> web.Response:
    (_, details), (_, reviews) = await asyncio.gather(
        get_json(request, f"{DETAILS_URL}/details/0", tries=1), get_json(request, f"{REVIEWS_URL}/reviews/0", tries=2)
    )
    return web.Response(text=page(request.cookies.get("user"), details, reviews), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    user = request.query.get("user")
    if request.method == "POST":
        form = await request.post()
        user = str(form.get("username") or "") or user
    response = web.HTTPFound("/productpage")
    if user:
        response.set_cookie("user", user, path="/")
    return response


async def logout(_: web.Request) -> web.Response:
    response = web.HTTPFound("/productpage")
    response.del_cookie("user", path="/")
    return response


async def index(_: web.Request) -> web.Response:
    return web.Response(text='<a href="/productpage">bookinfo productpage</a>', content_type="text/html")


async def products(_: web.Request) -> web.Response:
    return web.json_response(
        [{"id": PRODUCT["id"], "title": PRODUCT["title"], "descriptionHtml": PRODUCT["descriptionHtml"]}]
    )


async def product_reviews(request: web.Request) -> web.Response:
    status, body = await get_json(request, f"{REVIEWS_URL}/reviews/{request.match_info['id']}", tries=2)
    return web.json_response(body or {"error": REVIEWS_UNAVAILABLE}, status=200 if body else status)


if __name__ == "__main__":
    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/", index)
    app.router.add_get("/productpage", product_page)
    app.router.add_route("*", "/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/api/v1/products", products)
    app.router.add_get("/api/v1/products/{id}/reviews", product_reviews)
    serve(app)
