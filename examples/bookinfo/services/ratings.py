"""bookinfo `ratings`: the stars each reviewer gave, as Istio's ratings service returns them.

v1 holds them in memory. With DB_TYPE=mysql (Istio's ratings v2-mysql) each request reads
them from the `test.ratings` table of MYSQL_DB_HOST:MYSQL_DB_PORT as MYSQL_DB_USER /
MYSQL_DB_PASSWORD, one connection per request as Istio's does, and a database that cannot
be read gives Istio's 500 "could not connect to ratings database".
"""

from __future__ import annotations

import asyncio
import os

import pymysql
from aiohttp import web
from common import serve

DB_TIMEOUT = 5


def read_database() -> dict[str, int]:
    connection = pymysql.connect(
        host=os.environ["MYSQL_DB_HOST"],
        port=int(os.environ.get("MYSQL_DB_PORT", "3306")),
        user=os.environ["MYSQL_DB_USER"],
        password=os.environ["MYSQL_DB_PASSWORD"],
        database="test",
        connect_timeout=DB_TIMEOUT,
        read_timeout=DB_TIMEOUT,
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT Rating FROM ratings")
            rows = cursor.fetchall()
    finally:
        connection.close()
    stars = [row[0] for row in rows[:2]] + [0, 0]
    return {"Reviewer1": stars[0], "Reviewer2": stars[1]}


async def ratings(request: web.Request) -> web.Response:
    try:
        book_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": "please provide numeric product id"}, status=400)
    if os.environ.get("DB_TYPE") != "mysql":
        return web.json_response({"id": book_id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
    try:
        stars = await asyncio.to_thread(read_database)
    except pymysql.MySQLError as exc:
        print(f"ratings: reading {os.environ['MYSQL_DB_HOST']} failed: {exc}", flush=True)
        return web.json_response({"error": "could not connect to ratings database"}, status=500)
    return web.json_response({"id": book_id, "ratings": stars})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/ratings/{id}", ratings)
    serve(app)
