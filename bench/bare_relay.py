"""The floor: a bare aiohttp relay (parse, forward, write back; nothing else).

No auth, guard, metering or outbox. The harness runs it next to the proxy so the
report shows what the proxy's pipeline costs on top of aiohttp itself.

Run: python -m bench.bare_relay --port 18102 --upstream http://127.0.0.1:18100/v1
"""

from __future__ import annotations

import argparse

import aiohttp
import orjson
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    url = request.app["upstream"] + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].post(url, data=orjson.dumps(body), headers=headers) as up:
        if not body.get("stream"):
            return web.Response(body=await up.read(), content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        async for data in up.content.iter_any():
            await out.write(data)
        await out.write_eof()
        return out


def build(upstream: str) -> web.Application:
    app = web.Application()
    app["upstream"] = upstream

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))  # type: ignore[arg-type,return-value]
    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--uvloop", action="store_true")
    a = p.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    web.run_app(build(a.upstream), host="127.0.0.1", port=a.port, access_log=None, print=None)
