"""A small upstream service for gateway tests, run as its own process.

    python -m tests.framework.gateway.upstream_app --name a

prints `port <n>` once it listens on 127.0.0.1 (an ephemeral port), then serves:

    /ready                 200, or 503 after POST /control/unready
    /slow?ms=N             answers after N milliseconds
    /hold/<key>            answers once POST /release/<key> comes (GET /holding lists the keys)
    /status/<code>         answers with that status
    /xml                   an XML document
    /cookies               two Set-Cookie headers
    /json                  {"order_id": "o-1", "customer": {"name": "Ada"}, ...}
    anything else          200 with what it received: name, method, path, query, headers, body
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from aiohttp import web


def build(name: str) -> web.Application:
    state = {"ready": True, "hits": 0}
    releases: dict[str, asyncio.Event] = {}

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if state["ready"] else 503, text=name)

    async def control(request: web.Request) -> web.Response:
        state["ready"] = request.match_info["what"] == "ready"
        return web.Response(text="ok")

    async def hits(request: web.Request) -> web.Response:
        return web.json_response({"hits": state["hits"]})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
        return web.json_response({"name": name, "slept_ms": int(request.query.get("ms", "100"))})

    async def hold(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        releases[key] = asyncio.Event()
        try:
            await releases[key].wait()
        finally:
            del releases[key]
        return web.json_response({"name": name, "held": key})

    async def release(request: web.Request) -> web.Response:
        event = releases.get(request.match_info["key"])
        if event is None:
            return web.Response(status=404, text="nothing held under that key")
        event.set()
        return web.Response(text="ok")

    async def holding(request: web.Request) -> web.Response:
        return web.json_response(sorted(releases))

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"name": name}, status=int(request.match_info["code"]))

    async def xml(request: web.Request) -> web.Response:
        return web.Response(
            body=b"<order><order_id>o-1</order_id><total>12.50</total></order>",
            content_type="application/xml",
        )

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="two cookies")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    async def document(request: web.Request) -> web.Response:
        return web.json_response(
            {"order_id": "o-1", "customer": {"name": "Ada"}, "total": 1250, "served_by": name}
        )

    async def echo(request: web.Request) -> web.Response:
        state["hits"] = int(state["hits"]) + 1
        body = await request.read()
        return web.Response(
            body=orjson.dumps(
                {
                    "name": name,
                    "method": request.method,
                    "path": request.raw_path.split("?", 1)[0],
                    "query": request.query_string,
                    "headers": {str(k).lower(): v for k, v in request.headers.items()},
                    "body": body.decode(errors="replace"),
                }
            ),
            content_type="application/json",
            headers={"Cache-Control": "max-age=60", "X-Upstream": name},
        )

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_post("/control/{what}", control)
    app.router.add_get("/hits", hits)
    app.router.add_get("/slow", slow)
    app.router.add_get("/hold/{key}", hold)
    app.router.add_post("/release/{key}", release)
    app.router.add_get("/holding", holding)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/xml", xml)
    app.router.add_get("/json", document)
    app.router.add_get("/cookies", cookies)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(name: str) -> None:
    runner = web.AppRunner(build(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"port {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.name))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
